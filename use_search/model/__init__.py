"""Embedders: the crop-CLIP baseline and the USE model (paper §3.2), behind one ``Embedder`` interface;
and their query side (``TextEmbedder``: CLIP's text tower alone, the same model id)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from use_search.config import Settings
from use_search.model.base import Embedder

if TYPE_CHECKING:
    from use_search.model.text_tower import TextEmbedder
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


def load_query_embedder(settings: Settings, preset: Preset, device: str) -> "TextEmbedder":
    """What ``load_embedder`` gives, for texts only: the text tower of the same CLIP (for USE, the
    CLIP its checkpoint names) and the same ``model_id``, so the store's model check holds."""
    from use_search.model.text_tower import TextEmbedder, load_text_clip

    from use_search.model.registry import model_id

    if settings.use_checkpoint is not None:
        from use_search.model.checkpoint import check_use_preset, open_use_checkpoint

        ckpt = open_use_checkpoint(settings.use_checkpoint)
        config = ckpt.config
        check_use_preset(ckpt.path, config, settings)
        clip = load_text_clip(config.clip, settings, config.clip_arch, device)
        tag = model_id(clip.model_id, ckpt.tag, untrained_tiny=config.is_tiny)
        return TextEmbedder(clip, tag, config.is_tiny or config.trained_steps == 0, device)
    clip = load_text_clip(preset.clip, settings, device=device)
    return TextEmbedder(clip, model_id(clip.model_id), preset.untrained, device)


__all__ = ["Embedder", "load_embedder", "load_query_embedder"]
