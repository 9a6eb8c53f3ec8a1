"""SAM segmenters: automatic masks from a point grid, and box prompts (paper §3.1)."""

from __future__ import annotations

from use_search.config import Settings
from use_search.presets import Preset
from use_search.segmenter.automatic import AutoMaskParams, AutoSegmenter
from use_search.segmenter.sam import load_sam


def auto_mask_params(settings: Settings, preset: Preset) -> AutoMaskParams:
    a = settings.amg
    return AutoMaskParams(
        points_per_side=a.points_per_side or preset.points_per_side,
        points_per_batch=a.points_per_batch,
        pred_iou_thresh=preset.pred_iou_thresh if a.pred_iou_thresh is None else a.pred_iou_thresh,
        stability_score_thresh=(
            preset.stability_score_thresh if a.stability_score_thresh is None else a.stability_score_thresh
        ),
        stability_score_offset=a.stability_score_offset,
        box_nms_thresh=a.box_nms_thresh,
        crop_n_layers=a.crop_n_layers,
        min_mask_region_area=a.min_mask_region_area,
    )


def load_auto_segmenter(settings: Settings, preset: Preset, device: str) -> tuple[AutoSegmenter, str]:
    sam, sam_id = load_sam(preset.sam, settings, device)
    return AutoSegmenter(sam, auto_mask_params(settings, preset)), sam_id


__all__ = ["AutoMaskParams", "AutoSegmenter", "auto_mask_params", "load_auto_segmenter", "load_sam"]
