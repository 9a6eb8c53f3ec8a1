"""Automatic segments from a grid of point prompts (SAM's "segment everything")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam

from use_search.masks import clean_mask, mask_bbox
from use_search.types import Segment


@dataclass(frozen=True)
class AutoMaskParams:
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    min_mask_region_area: int = 0


class AutoSegmenter:
    """segment-anything's ``SamAutomaticMaskGenerator`` → ``Segment``s, largest first.

    ``min_mask_region_area`` post-processing is done here with scipy (segment-anything's own needs
    OpenCV): holes and islands below the area are removed, then empty masks are dropped.
    """

    def __init__(self, sam: Sam, params: AutoMaskParams) -> None:
        self.params = params
        self.generator = SamAutomaticMaskGenerator(
            sam,
            points_per_side=params.points_per_side,
            points_per_batch=params.points_per_batch,
            pred_iou_thresh=params.pred_iou_thresh,
            stability_score_thresh=params.stability_score_thresh,
            stability_score_offset=params.stability_score_offset,
            box_nms_thresh=params.box_nms_thresh,
            crop_n_layers=params.crop_n_layers,
            min_mask_region_area=0,
            output_mode="binary_mask",
        )

    @torch.inference_mode()
    def segment(self, image: np.ndarray) -> list[Segment]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 RGB image, got {image.shape} {image.dtype}")
        out: list[Segment] = []
        for rec in self.generator.generate(image):
            mask = rec["segmentation"]
            if self.params.min_mask_region_area > 0:
                mask = clean_mask(mask, self.params.min_mask_region_area, self.params.min_mask_region_area)
            area = int(mask.sum())
            if area == 0:
                continue
            out.append(
                Segment(
                    mask=mask, bbox=mask_bbox(mask), area=area,
                    predicted_iou=float(rec["predicted_iou"]), stability_score=float(rec["stability_score"]),
                    source="auto",
                )
            )
        out.sort(key=lambda s: -s.area)
        return out
