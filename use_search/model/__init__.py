"""Embedders: the crop-CLIP baseline and the USE model (paper §3.2), behind one ``Embedder`` interface."""

from __future__ import annotations

from use_search.config import Settings
from use_search.model.base import Embedder
from use_search.presets import Preset


def load_embedder(settings: Settings, preset: Preset, device: str) -> Embedder:
    """The USE model when a checkpoint is configured (``--model`` / ``USE_SEARCH_USE_CHECKPOINT``),
    otherwise the training-free crop-CLIP baseline on the preset's CLIP."""
    if settings.use_checkpoint is not None:
        from use_search.model.use import load_use_embedder

        return load_use_embedder(settings.use_checkpoint, settings, device)
    from use_search.model.clip import load_clip
    from use_search.model.crop_clip import CropClipEmbedder

    clip = load_clip(preset.clip, settings, device=device)
    return CropClipEmbedder(clip, device, batch=settings.embed_batch, untrained=preset.untrained)


__all__ = ["Embedder", "load_embedder"]
