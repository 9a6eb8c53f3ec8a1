"""Pieces both automatic-mask engines share, where they deliberately differ from segment-anything.

- ``ResizeToEncoder``: segment-anything's ``ResizeLongestSide`` that never rounds a side to 0 pixels,
  so very thin images (1×4000) are segmented instead of failing inside PIL.
- ``box_nms``: torchvision's ``batched_nms`` as segment-anything calls it, except for boxes of zero
  width or height (a one-pixel-wide mask, or any mask of a 1-pixel-high image): their IoU is 0/0 = NaN
  there, so they never suppress each other and a 1×1 image kept every one of its grid's masks.
- ``postprocess_small_regions``: segment-anything's ``min_mask_region_area`` step (fill small holes,
  drop small islands, then a second box NMS that prefers unchanged masks) with scipy for OpenCV.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import batched_nms

from use_search.masks import clean_mask_changed, mask_bbox


class ResizeToEncoder(ResizeLongestSide):
    """``ResizeLongestSide`` with every side at least one pixel (segment-anything rounds 4000×1 to
    1024×0). Identical to it for every image whose short side survives the rounding."""

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        h, w = ResizeLongestSide.get_preprocess_shape(oldh, oldw, long_side_length)
        return max(h, 1), max(w, 1)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by greedy box NMS, best score first.

    ``boxes`` are XYXY with inclusive ends, as ``batched_mask_to_box`` gives them (a one-pixel mask is
    ``[x, y, x, y]``). Boxes with area > 0 go through torchvision's ``batched_nms`` exactly as in
    segment-anything. Boxes of zero width or height — which torchvision's IoU gives 0 against any
    other box and NaN against each other, so they never interact — are suppressed among themselves by
    the IoU of their pixel extents (``x1 + 1``, ``y1 + 1``). Empty masks must be removed first.
    """
    boxes = boxes.float()
    scores = scores.float()
    flat = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if not bool(flat.any()):
        return batched_nms(boxes, scores, torch.zeros_like(scores), iou_threshold)
    parts = []
    for group, extent in ((~flat, 0.0), (flat, 1.0)):
        idx = group.nonzero().squeeze(1)
        if idx.numel():
            b = boxes[idx] + torch.tensor([0.0, 0.0, extent, extent], device=boxes.device)
            parts.append(idx[batched_nms(b, scores[idx], torch.zeros_like(scores[idx]), iou_threshold)])
    keep = torch.cat(parts).sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def postprocess_small_regions(
    masks: Sequence[np.ndarray], min_area: int, nms_thresh: float
) -> tuple[list[int], list[np.ndarray]]:
    """segment-anything's ``SamAutomaticMaskGenerator.postprocess_small_regions``.

    Fills holes and drops islands smaller than ``min_area`` (8-connected, see
    ``masks.remove_small_regions``), then box NMS over the cleaned masks' boxes with score 1 for
    unchanged and 0 for changed masks, at ``nms_thresh`` (segment-anything uses
    ``max(box_nms_thresh, crop_nms_thresh)``). ``masks`` in the generator's order (NMS keep order),
    none empty. Returns the kept indices in NMS order and every cleaned mask.
    """
    if not masks:
        return [], []
    cleaned, scores, boxes = [], [], []
    for mask in masks:
        new, changed = clean_mask_changed(mask, min_area, min_area)
        cleaned.append(new)
        scores.append(0.0 if changed else 1.0)
        x, y, w, h = mask_bbox(new)
        boxes.append([x, y, x + w - 1, y + h - 1])
    keep = box_nms(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores), nms_thresh)
    return keep.tolist(), cleaned
