"""Image and mask geometry shared by inference and training: the letterbox square and the patch
weights of segments (paper §3.2). Light imports only (numpy, torch), so data workers load it cheaply."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def letterbox_side(height: int, width: int, grid: int) -> int:
    """Side L of the square the image is padded to: the smallest multiple of ``grid`` ≥ both sides,
    so each patch covers an integer L/G × L/G block of original pixels."""
    return grid * -(-max(height, width) // grid)


def letterbox(image: np.ndarray, grid: int, fill: Sequence[float], device: str | torch.device = "cpu") -> torch.Tensor:
    """H×W×3 uint8 → (3, L, L) float32 in [0, 1] on ``device``: the image at top-left, ``fill`` colour
    elsewhere. The uint8 pixels travel to the device, not the 4× larger floats."""
    h, w = image.shape[:2]
    side = letterbox_side(h, w, grid)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).to(device)
    out = torch.tensor(fill, dtype=torch.float32, device=device).view(3, 1, 1).repeat(1, side, side)
    out[:, :h, :w] = pixels.permute(2, 0, 1).float() / 255.0
    return out


def _rows_any(mask: np.ndarray) -> np.ndarray:
    """``mask.any(axis=1)``, reading 8 pixels per step when the row layout allows (the one full scan)."""
    if mask.dtype == np.bool_ and mask.flags.c_contiguous and mask.shape[1] % 8 == 0:
        return mask.view(np.uint64).any(axis=1)
    return mask.any(axis=1)


def segment_patch_weights(masks: Sequence[np.ndarray], grid: int, side: int | None = None) -> np.ndarray:
    """H×W bool masks → (n, G·G) float32: the fraction of each patch the mask covers (§3.2: the
    segment's area within each patch normalised by the patch area). The image is taken as letterboxed
    (top-left in a ``side``×``side`` square, default ``letterbox_side``), so patches are k×k pixel
    blocks with k = side / G. Only the patch-aligned bounding window of each mask is summed: the cost
    follows the segment's size, not the image's. Raises ``ValueError`` for an empty mask."""
    if not len(masks):
        return np.zeros((0, grid * grid), np.float32)
    h, w = masks[0].shape
    side = side or letterbox_side(h, w, grid)
    k = side // grid
    if k * grid != side or max(h, w) > side:
        raise ValueError(f"a {h}x{w} mask does not fit a {side}-pixel square of {grid}x{grid} whole patches")
    out = np.zeros((len(masks), grid, grid), np.float32)
    for i, mask in enumerate(masks):
        if mask.shape != (h, w):
            raise ValueError(f"segment {i}: mask shape {mask.shape} differs from {(h, w)}")
        rows = np.flatnonzero(_rows_any(mask))
        if not len(rows):
            raise ValueError(f"segment {i} has an empty mask: no patch to pool its embedding from")
        cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
        r0, r1 = rows[0] // k, -(-(rows[-1] + 1) // k)
        c0, c1 = cols[0] // k, -(-(cols[-1] + 1) // k)
        window = np.zeros(((r1 - r0) * k, (c1 - c0) * k), np.uint8)
        part = mask[r0 * k : r1 * k, c0 * k : c1 * k]  # shorter than the window at the letterbox edge
        window[: part.shape[0], : part.shape[1]] = part
        out[i, r0:r1, c0:c1] = window.reshape(r1 - r0, k, c1 - c0, k).sum(axis=(1, 3), dtype=np.int32) / (k * k)
    return out.reshape(len(masks), grid * grid)
