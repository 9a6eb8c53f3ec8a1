"""SAM segmenters: automatic masks from a point grid, and box prompts (paper §3.1)."""

from __future__ import annotations

from use_search.config import Settings
from use_search.presets import Preset
from use_search.segmenter.automatic import AutoMaskParams, AutoSegmenter
from use_search.segmenter.batched import BatchedAutoSegmenter, BatchOptions
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
        crop_nms_thresh=a.crop_nms_thresh,
        crop_overlap_ratio=a.crop_overlap_ratio,
        crop_n_points_downscale_factor=a.crop_n_points_downscale_factor,
        min_mask_region_area=a.min_mask_region_area,
        precision=a.precision,
    )


def load_auto_segmenter(
    settings: Settings, preset: Preset, device: str
) -> tuple[AutoSegmenter | BatchedAutoSegmenter, str]:
    """The batched generator (``amg.engine="batched"``, the default) or segment-anything's own loop
    (``"reference"``); with precision exact both give the same masks up to float32 rounding (segmenter/batched.py)."""
    sam, sam_id = load_sam(preset.sam, settings, device)
    params = auto_mask_params(settings, preset)
    if settings.amg.engine == "batched":
        return BatchedAutoSegmenter(sam, params), sam_id
    return AutoSegmenter(sam, params), sam_id


__all__ = [
    "AutoMaskParams", "AutoSegmenter", "BatchOptions", "BatchedAutoSegmenter", "auto_mask_params",
    "load_auto_segmenter", "load_sam",
]
