"""Assemble the parts a command needs from ``Settings``: store, segmenter, embedder, indexer, searcher.

The CLI and the HTTP API both build through here, so they always agree on models and store.
"""

from __future__ import annotations

from dataclasses import dataclass

from use_search.config import Settings
from use_search.indexer.runner import Indexer
from use_search.model import Embedder, load_embedder
from use_search.presets import Preset, get_preset
from use_search.query.search import Searcher
from use_search.segmenter import AutoSegmenter, BatchedAutoSegmenter, load_auto_segmenter
from use_search.store import VectorStore, open_store
from use_search.weights import MissingWeightsError, resolve


def preflight(settings: Settings, preset: Preset, parts: tuple[str, ...] = ("sam", "clip")) -> None:
    """Resolve every checkpoint a run needs before loading anything, and name all missing ones at once.

    With a USE checkpoint the embedding backbones are the ones its config names, not the preset's."""
    names = [getattr(preset, p) for p in parts if p != "clip"]
    if "clip" in parts:
        if settings.use_checkpoint is not None:
            from use_search.model.checkpoint import read_use_config

            cfg = read_use_config(settings.use_checkpoint)
            names += [cfg.clip, cfg.dinov2]
        else:
            names.append(preset.clip)
    errors = []
    for name in [n for n in names if n != "tiny"]:
        try:
            resolve(name, settings)
        except MissingWeightsError as e:
            errors.append(str(e))
    if errors:
        raise MissingWeightsError(
            f"this run needs {len(errors)} checkpoint(s) that are not here:\n" + "\n".join(errors)
        )


@dataclass
class Runtime:
    settings: Settings
    preset: Preset
    device: str

    @classmethod
    def from_settings(cls, settings: Settings) -> "Runtime":
        return cls(settings, get_preset(settings.preset), settings.torch_device())

    def preflight(self, parts: tuple[str, ...]) -> None:
        preflight(self.settings, self.preset, parts)

    def store(self) -> VectorStore:
        return open_store(self.settings)

    def embedder(self) -> Embedder:
        preflight(self.settings, self.preset, ("clip",))
        return load_embedder(self.settings, self.preset, self.device)

    def segmenter(self) -> AutoSegmenter | BatchedAutoSegmenter:
        preflight(self.settings, self.preset, ("sam",))
        return load_auto_segmenter(self.settings, self.preset, self.device)[0]

    def indexer(self, store: VectorStore) -> Indexer:
        preflight(self.settings, self.preset, ("sam", "clip"))
        s = self.settings
        return Indexer(
            store, self.segmenter(), self.embedder(),
            max_image_pixels=s.max_image_pixels, batch_images=s.batch_images, extensions=s.image_extensions,
            pipeline=s.index_pipeline, decode_threads=s.decode_threads,
        )

    def searcher(self, store: VectorStore) -> Searcher:
        return Searcher(store, self.embedder())
