"""Assemble the parts a command needs from ``Settings``: store, segmenter, embedder, indexer, searcher.

The CLI and the HTTP API both build through here, so they always agree on models and store. Every
heavy import (segment-anything, open_clip, timm, the stores' clients) happens inside the method that
needs it: a text query loads CLIP's text tower and the store, nothing else (see ``query_embedder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from use_search.config import Settings
from use_search.model.registry import parse
from use_search.presets import Preset, preset_for
from use_search.weights import MissingWeightsError, missing_weights_error

if TYPE_CHECKING:
    from use_search.indexer.runner import EngineParts, Indexer
    from use_search.model import Embedder
    from use_search.model.text_tower import TextEmbedder
    from use_search.query.search import Searcher
    from use_search.segmenter import AutoSegmenter, BatchedAutoSegmenter
    from use_search.store import VectorStore
    from use_search.voting.ensemble import Ensemble
    from use_search.voting.stored import Labeler


def preflight(settings: Settings, preset: Preset, parts: tuple[str, ...] = ("sam", "clip")) -> None:
    """Resolve every checkpoint a run needs before loading anything, and name all missing ones at once.

    Parts: ``sam``; ``clip`` = the embedder (CLIP, plus DINOv2 for USE); ``text`` = only the CLIP
    whose text tower embeds queries. With a USE checkpoint the backbones are the ones its config
    names, not the preset's."""
    needed: list[tuple[str, str]] = [("sam", preset.sam)] if "sam" in parts else []
    if "clip" in parts or "text" in parts:
        if settings.use_checkpoint is not None:
            from use_search.model.checkpoint import open_use_checkpoint

            cfg = open_use_checkpoint(settings.use_checkpoint).config
            needed.append(("clip", cfg.clip))
            if "clip" in parts:
                needed.append(("dinov2", cfg.dinov2))
        else:
            needed.append(("clip", preset.clip))
    errors = []
    for kind, name in needed:
        try:
            parse(kind, name, settings)  # type: ignore[arg-type]
        except MissingWeightsError as e:
            errors.append(str(e))
    if errors:
        raise missing_weights_error(errors)


@dataclass
class Runtime:
    settings: Settings
    preset: Preset  # with --sam / --clip / --dinov2 applied
    device: str

    @classmethod
    def from_settings(cls, settings: Settings) -> "Runtime":
        return cls(settings, preset_for(settings), settings.torch_device())

    def preflight(self, parts: tuple[str, ...]) -> None:
        preflight(self.settings, self.preset, parts)

    def store(self, *, writable: bool = True) -> "VectorStore":
        from use_search.store import open_store

        return open_store(self.settings, writable=writable)

    def store_writable(self) -> bool:
        """False for an embedded store in a folder this process cannot write (a read-only mount, no
        permission): it can only be opened to read (``store(writable=False)``), as the store layer decides."""
        s = self.settings
        if s.store.backend != "embedded":
            return True
        from use_search.store.edge_files import can_write

        return can_write(s.store_path / s.store.collection)

    def embedder(self) -> "Embedder":
        from use_search.model import load_embedder

        preflight(self.settings, self.preset, ("clip",))
        return load_embedder(self.settings, self.preset, self.device)

    def query_embedder(self) -> "TextEmbedder":
        """Texts only, with the index side's model id: CLIP's text tower, no image tower, no SAM."""
        from use_search.model import load_query_embedder

        preflight(self.settings, self.preset, ("text",))
        return load_query_embedder(self.settings, self.preset, self.device)

    def segmenter(self) -> "AutoSegmenter | BatchedAutoSegmenter":
        from use_search.segmenter import load_auto_segmenter

        preflight(self.settings, self.preset, ("sam",))
        return load_auto_segmenter(self.settings, self.preset, self.device)[0]

    def engine_parts(self) -> "EngineParts":
        """The segment+embed stage's parts: the segmenter, the embedder, and the working size images are
        decoded to (``imaging.working_side``). Every runner takes them from here: the indexer, Ray's
        actors (``engine_parts``), the API's worker, eval."""
        from use_search.imaging import working_side

        segmenter = self.segmenter()
        return segmenter, self.embedder(), working_side(segmenter, self.settings.work_side)

    def indexer(self, store: "VectorStore") -> "Indexer":
        """The indexer, whose segmenter and embedder are built on the first image that needs them: a
        rerun that finds nothing new (or only moved and copied files) loads no model. Missing
        checkpoints are still reported here, before any work."""
        from use_search.indexer.runner import Indexer

        preflight(self.settings, self.preset, ("sam", "clip"))
        s = self.settings
        return Indexer(
            store, build=self.engine_parts, max_image_pixels=s.max_image_pixels, batch_images=s.batch_images,
            extensions=s.image_extensions, pipeline=s.index_pipeline, decode_threads=s.decode_threads,
        )

    def labeler(
        self, store: "VectorStore", embedder: "TextEmbedder | None" = None, fallback: str | None = None
    ) -> "Labeler":
        """§4.3 voting over the store's own masks and vectors (``use-search label``): class names
        embedded by the store's model's text side, at that model's softmax scale (a USE checkpoint's
        training scale, crop-CLIP's 100; ``voting.logit_scale`` overrides), ``voting`` templates;
        ``fallback`` (default ``voting.fallback``, else none) for pixels no stored segment covers."""
        from use_search.model.text import template_set
        from use_search.voting.combine import CLIP_LOGIT_SCALE
        from use_search.voting.stored import LABEL_FALLBACK, Labeler

        v = self.settings.voting
        scale = v.logit_scale
        if scale is None and self.settings.use_checkpoint is not None:
            from use_search.model.checkpoint import read_use_config

            scale = read_use_config(self.settings.use_checkpoint).logit_scale
        return Labeler(store, embedder or self.query_embedder(), scale or CLIP_LOGIT_SCALE,
                       template_set(v.templates), fallback or v.fallback or LABEL_FALLBACK)

    def searcher(self, store: "VectorStore") -> "Searcher":
        from use_search.query.search import Searcher

        return Searcher(store, self.query_embedder())


def engine_parts(settings: Settings) -> "EngineParts":
    """``Runtime.engine_parts`` from settings alone: a module-level function, so that Ray can ship it to
    its actors (``index_with_ray``'s ``build_parts``)."""
    return Runtime.from_settings(settings).engine_parts()


def load_ensemble(settings: Settings, default: "Embedder | None" = None) -> "Ensemble":
    """The voting models of ``settings.voting.models`` (each USE checkpoint loaded once, on the
    settings' device), or, when none are listed, ``default`` / the one configured embedder (A.2)."""
    from use_search.voting.ensemble import Ensemble, EnsembleMember

    v = settings.voting
    if not v.models:
        return Ensemble([EnsembleMember(default or Runtime.from_settings(settings).embedder())], v.combine)
    runtimes = [Runtime.from_settings(settings.model_copy(update={"use_checkpoint": m.path})) for m in v.models]
    for rt in runtimes:  # every missing file is named before any model loads
        rt.preflight(("clip",))
    members = [
        EnsembleMember(rt.embedder(), m.weight, source=str(m.path)) for rt, m in zip(runtimes, v.models)
    ]
    return Ensemble(members, v.combine)
