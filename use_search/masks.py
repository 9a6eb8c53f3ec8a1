"""Mask utilities: COCO RLE (pycocotools), bbox/area, hole filling and island removal, mask NMS."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Bool H×W mask → COCO compressed RLE with ``counts`` as str (JSON-safe)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    counts = rle["counts"]
    coco = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(coco).astype(bool)


def rle_area(rle: dict[str, Any]) -> int:
    return int(mask_utils.area(_coco(rle)))


def rle_bbox(rle: dict[str, Any]) -> tuple[int, int, int, int]:
    x, y, w, h = mask_utils.toBbox(_coco(rle)).tolist()
    return int(x), int(y), int(w), int(h)


def _coco(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight COCO XYWH box of a bool mask; (0, 0, 0, 0) for an empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)


def iou_matrix(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> np.ndarray:
    """Pairwise mask IoU between two lists of RLEs (pycocotools, no decoding)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou([_coco(r) for r in a], [_coco(r) for r in b], [0] * len(b)))


def remove_small_regions(mask: np.ndarray, area_thresh: int, mode: str) -> np.ndarray:
    """Fill holes (``mode="holes"``) or drop islands (``mode="islands"``) smaller than ``area_thresh``.

    Same rule as SAM's post-processing (paper §3.1), done with scipy instead of OpenCV. Holes are
    background components not touching the image border; like SAM, the largest island is kept even
    if it is small, so a non-empty mask never becomes empty.
    """
    if area_thresh <= 0 or not mask.any():
        return mask
    if mode == "holes":
        labels, n = ndimage.label(~mask)
        if n == 0:
            return mask
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh and (i + 1) not in border]
        return mask | np.isin(labels, small)
    if mode == "islands":
        labels, n = ndimage.label(mask)
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
        keep = [i + 1 for i, s in enumerate(sizes) if s >= area_thresh]
        if not keep:
            keep = [int(np.argmax(sizes)) + 1]
        return np.isin(labels, keep)
    raise ValueError(f"mode must be 'holes' or 'islands', not {mode!r}")


def clean_mask(mask: np.ndarray, hole_area: int, island_area: int) -> np.ndarray:
    """SAM's post-processing (paper §3.1): fill holes, then drop islands, below the given areas."""
    return remove_small_regions(remove_small_regions(mask, hole_area, "holes"), island_area, "islands")


def mask_nms(
    rles: Sequence[dict[str, Any]], scores: Sequence[float], iou_threshold: float
) -> list[list[int]]:
    """Greedy mask NMS. Returns groups: ``[kept, *suppressed_by_it]`` in descending score order.

    The caller merges whatever it carries (e.g. texts, paper §3.1) over each group; the kept index is
    always the first element.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ious = iou_matrix(list(rles), list(rles))
    assigned = np.zeros(len(rles), dtype=bool)
    groups: list[list[int]] = []
    for i in order:
        if assigned[i]:
            continue
        dup = [int(j) for j in order if not assigned[j] and j != i and ious[i, j] > iou_threshold]
        assigned[i] = True
        assigned[dup] = True
        groups.append([int(i), *dup])
    return groups


def patch_weights(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch covered by the mask (paper §3.2: segment area in a patch / patch area).

    ``mask`` must already be at the encoder's input resolution, divisible by ``grid``.
    """
    h, w = mask.shape
    gh, gw = grid
    if h % gh or w % gw:
        raise ValueError(f"mask {h}x{w} is not divisible into a {gh}x{gw} patch grid")
    return mask.reshape(gh, h // gh, gw, w // gw).mean(axis=(1, 3), dtype=np.float64)
