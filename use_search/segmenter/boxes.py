"""Box prompts → masks (paper §3.1, "Mask Generation with Box Prompt").

For each box SAM predicts three masks; we keep the non-empty one with the highest stability score, fill small
holes and drop small islands (segment-anything's ``remove_small_regions``: 8-connected regions by size,
see ``masks.remove_small_regions``), and a box covering more than 90% of the image
becomes the whole-image mask without running SAM. §4.1 lowers SAM's predicted-IoU and stability
thresholds to 0.6 for curation; a box whose chosen mask falls below them yields no segment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.amg import calculate_stability_score

from use_search.config import BoxPromptSettings
from use_search.masks import clean_mask, mask_bbox
from use_search.segmenter.amg import ResizeToEncoder
from use_search.types import Segment

BoxXYXY = tuple[float, float, float, float]


class BoxSegmenter:
    """SAM with box prompts, batched through ``SamPredictor.predict_torch``.

    ``segment(image, boxes)`` returns one entry per box, in order: a ``Segment`` (source ``"box"`` or
    ``"whole-image"``) or ``None`` when the box is degenerate, its mask is below the thresholds, or the
    mask is empty after post-processing. A threshold of ``None`` filters nothing (random-init SAMs
    predict IoUs around zero, even below).
    """

    def __init__(
        self,
        sam: Sam,
        box: BoxPromptSettings | None = None,
        *,
        pred_iou_thresh: float | None = None,
        stability_score_thresh: float | None = None,
        stability_score_offset: float = 1.0,
        boxes_per_batch: int = 16,
    ) -> None:
        self.predictor = SamPredictor(sam)
        self.predictor.transform = ResizeToEncoder(sam.image_encoder.img_size)  # thin images too
        self.box = box or BoxPromptSettings()
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.boxes_per_batch = boxes_per_batch

    @torch.inference_mode()
    def segment(self, image: np.ndarray, boxes: Sequence[BoxXYXY]) -> list[Segment | None]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 RGB image, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        out: list[Segment | None] = [None] * len(boxes)
        sam_boxes: list[int] = []
        clipped = [clip_box(b, w, h) for b in boxes]
        for i, (x0, y0, x1, y1) in enumerate(clipped):
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            if (x1 - x0) * (y1 - y0) > self.box.whole_image_box_fraction * w * h:
                out[i] = whole_image_segment(h, w)
            else:
                sam_boxes.append(i)
        if not sam_boxes:
            return out
        self.predictor.set_image(image)
        device = self.predictor.device
        for start in range(0, len(sam_boxes), self.boxes_per_batch):
            idx = sam_boxes[start : start + self.boxes_per_batch]
            tb = torch.tensor([clipped[i] for i in idx], dtype=torch.float32, device=device)
            tb = self.predictor.transform.apply_boxes_torch(tb, (h, w))
            logits, iou_preds, _ = self.predictor.predict_torch(
                None, None, boxes=tb, multimask_output=True, return_logits=True
            )
            threshold = self.predictor.model.mask_threshold
            best, stability = most_stable(logits, threshold, self.stability_score_offset)
            rows = torch.arange(len(idx), device=device)
            masks = (logits[rows, best] > threshold).cpu().numpy()
            best_iou = iou_preds[rows, best].float().cpu().tolist()
            best_stability = stability[rows, best].float().cpu().tolist()
            for k, i in enumerate(idx):
                if not math.isfinite(best_stability[k]):  # every candidate of this box is empty
                    continue
                if self.pred_iou_thresh is not None and best_iou[k] < self.pred_iou_thresh:
                    continue
                if self.stability_score_thresh is not None and best_stability[k] < self.stability_score_thresh:
                    continue
                out[i] = self.post_process(masks[k], best_iou[k], best_stability[k])
        self.predictor.reset_image()
        return out

    def post_process(self, mask: np.ndarray, predicted_iou: float, stability: float) -> Segment | None:
        """Fill small holes, drop small islands (BoxPromptSettings areas); None for an empty mask (which
        segment-anything's hole filling would turn into the whole image when the image is small)."""
        if not mask.any():
            return None
        mask = clean_mask(mask, self.box.min_hole_area, self.box.min_island_area)
        area = int(mask.sum())
        return Segment(
            mask=mask, bbox=mask_bbox(mask), area=area,
            predicted_iou=predicted_iou, stability_score=stability, source="box",
        )


def most_stable(logits: torch.Tensor, threshold: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, H, W) mask logits of K candidates per box → each box's candidate with the highest stability
    score (§3.1) and the (B, K) scores, where an empty candidate scores -inf. segment-anything's
    stability of a mask with no pixel above ``threshold - offset`` is 0/0 = NaN, which ``argmax`` would
    pick and every threshold would let through; a box whose candidates are all empty scores -inf."""
    stability = calculate_stability_score(logits, threshold, offset)
    empty = ~(logits > threshold).flatten(-2).any(-1)
    stability = stability.masked_fill(empty | stability.isnan(), float("-inf"))
    return stability.argmax(dim=1), stability


def clip_box(box: BoxXYXY, width: int, height: int) -> BoxXYXY:
    x0, y0, x1, y1 = (float(v) for v in box)
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def whole_image_segment(height: int, width: int) -> Segment:
    mask = np.ones((height, width), dtype=bool)
    return Segment(
        mask=mask, bbox=(0, 0, width, height), area=height * width,
        predicted_iou=1.0, stability_score=1.0, source="whole-image",
    )
