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
    return mask_utils.decode(_coco(rle)).astype(bool)


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


_EIGHT = np.ones((3, 3), dtype=bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """segment-anything's ``remove_small_regions`` (utils/amg.py) with scipy instead of OpenCV.

    ``mode="holes"`` fills the 8-connected components of the background smaller than ``area_thresh``
    (by size only: background touching the image border is filled too when it is small);
    ``mode="islands"`` drops the 8-connected components of the mask smaller than it, keeping the
    largest one when every component is small. Returns ``(mask, changed)`` where ``changed`` is
    segment-anything's flag: some component was below the threshold (also when the only, small,
    island is kept). Ties for "largest" go to the component OpenCV numbers first (its first 2×2
    block in block-raster order), so the result is the same as segment-anything's pixel for pixel.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', not {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    holes = mode == "holes"
    labels, n = ndimage.label(mask ^ holes, structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    if holes:
        return mask | np.isin(labels, small), True
    keep = np.flatnonzero(sizes >= area_thresh) + 1
    if keep.size == 0:
        keep = _largest_as_opencv(labels, sizes)
    return np.isin(labels, keep), True


def _largest_as_opencv(labels: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The label of the largest component; among equal sizes, the one OpenCV's block-based labelling
    (8-connectivity) numbers first: by the first 2×2 block, in block-raster order, that it touches."""
    best = np.flatnonzero(sizes == sizes.max()) + 1
    if best.size > 1:
        rows, cols = np.nonzero(np.isin(labels, best))
        block = (rows // 2) * (labels.shape[1] // 2 + 1) + cols // 2
        first = [block[labels[rows, cols] == b].min() for b in best]
        best = best[[int(np.argmin(first))]]
    return best[:1]


def clean_mask(mask: np.ndarray, hole_area: float, island_area: float) -> np.ndarray:
    """SAM's post-processing (paper §3.1, segment-anything's ``min_mask_region_area``): fill holes
    smaller than ``hole_area``, then drop islands smaller than ``island_area`` (see
    ``remove_small_regions``). A non-empty mask never becomes empty."""
    return clean_mask_changed(mask, hole_area, island_area)[0]


def clean_mask_changed(mask: np.ndarray, hole_area: float, island_area: float) -> tuple[np.ndarray, bool]:
    """``clean_mask`` and segment-anything's "changed" flag (either step found a small region)."""
    mask, holes_changed = remove_small_regions(mask, hole_area, "holes")
    mask, islands_changed = remove_small_regions(mask, island_area, "islands")
    return mask, holes_changed or islands_changed


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
