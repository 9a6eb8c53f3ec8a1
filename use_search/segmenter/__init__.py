"""SAM segmenters: automatic masks from a point grid, and box prompts (paper §3.1)."""

from __future__ import annotations

from use_search.config import AutoMaskParams, Settings
from use_search.presets import Preset
from use_search.segmenter.automatic import AutoSegmenter
from use_search.segmenter.batched import BatchedAutoSegmenter, BatchOptions
from use_search.segmenter.sam import load_sam


def auto_mask_params(settings: Settings, preset: Preset) -> AutoMaskParams:
    """The ``amg`` settings with what they leave open taken from the preset."""
    return settings.amg.for_preset(preset)


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
