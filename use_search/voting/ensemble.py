"""The models of a voting ensemble (appendix A.2) and their class text vectors. The models are built
by the caller (``factory.load_ensemble``); nothing here loads a checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import numpy as np

from use_search.model.base import Embedder
from use_search.types import Segment
from use_search.voting.combine import (
    CLIP_LOGIT_SCALE,
    COMBINE_MODES,
    class_probabilities,
    combine_probabilities,
    ovseg_exponents,
)


class StageTimer(Protocol):
    """Adds the seconds since ``start`` to ``stage`` and returns the time now (``eval.common.Timer``)."""

    def add(self, stage: str, start: float) -> float: ...


def training_logit_scale(embedder: Embedder) -> float:
    """The softmax scale a model was trained with: a USE embedder's checkpoint config records it
    (``UseConfig.logit_scale``, τ of eq. 1); anything else (crop-CLIP) gets CLIP's 100."""
    scale = getattr(getattr(embedder, "config", None), "logit_scale", None)
    return float(scale) if scale else CLIP_LOGIT_SCALE


TEXT_CACHE_SIZE = 32  # class lists whose embeddings an ensemble keeps


@dataclass(frozen=True)
class EnsembleMember:
    embedder: Embedder
    weight: float = 1.0
    logit_scale: float | None = None  # None: the model's training scale (``training_logit_scale``)
    source: str | None = None  # the checkpoint file, for reports

    @property
    def scale(self) -> float:
        return float(self.logit_scale) if self.logit_scale else training_logit_scale(self.embedder)


class Ensemble:
    """Models whose per-segment class probabilities are combined before the vote (A.2). A single
    model is an ensemble of one (its probabilities pass through unchanged)."""

    def __init__(self, members: Sequence[EnsembleMember], combine: str = "ovseg") -> None:
        if not members:
            raise ValueError("an ensemble needs at least one model")
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown ensemble combination {combine!r}; choose one of {', '.join(COMBINE_MODES)}")
        for m in members:
            if not (np.isfinite(m.weight) and m.weight > 0):
                raise ValueError(f"ensemble weights must be positive numbers, got {m.weight} for {m.source or m.embedder.model_id}")
            if not (np.isfinite(m.scale) and m.scale > 0):
                raise ValueError(f"logit scale must be a positive number, got {m.scale}")
        if combine == "ovseg":
            ovseg_exponents([m.weight for m in members])
        self.members = list(members)
        self.combine = combine
        # Class-name embeddings per (classes, templates): a server answers the same class list many
        # times, and 80 templates per class (``imagenet80``) cost far more than a segment's vote.
        self._text_cache: dict[tuple[tuple[str, ...], tuple[str, ...] | None], list[np.ndarray]] = {}

    @classmethod
    def of(cls, models: "Embedder | Ensemble") -> "Ensemble":
        return models if isinstance(models, Ensemble) else cls([EnsembleMember(models)])

    def with_logit_scale(self, logit_scale: float | None) -> "Ensemble":
        """The same models with every softmax scale set to ``logit_scale`` (None: unchanged)."""
        if logit_scale is None:
            return self
        out = Ensemble([replace(m, logit_scale=logit_scale) for m in self.members], self.combine)
        out._text_cache = self._text_cache  # same text towers, same class vectors
        return out

    @property
    def untrained(self) -> bool:
        return any(m.embedder.untrained for m in self.members)

    def describe(self) -> list[dict[str, object]]:
        return [
            {"model": m.embedder.model_id, "checkpoint": m.source, "weight": m.weight, "logit_scale": m.scale}
            for m in self.members
        ]

    def class_vectors(self, classes: Sequence[str], templates: Sequence[str] | None = None) -> list[np.ndarray]:
        """Each model's (C, D) class text embeddings (models may differ in text tower)."""
        key = (tuple(classes), tuple(templates) if templates is not None else None)
        cached = self._text_cache.get(key)
        if cached is None:
            cached = [m.embedder.embed_texts(list(classes), templates) for m in self.members]
            if len(self._text_cache) >= TEXT_CACHE_SIZE:
                self._text_cache.pop(next(iter(self._text_cache)))  # oldest first
            self._text_cache[key] = cached
        return cached

    def probabilities(
        self, image: np.ndarray, segments: Sequence[Segment], class_vectors: Sequence[np.ndarray],
        timer: StageTimer | None = None,
    ) -> np.ndarray:
        """(N, C) combined class probabilities of ``segments``: every model embeds them once."""
        if len(class_vectors) != len(self.members):
            raise ValueError(f"{len(class_vectors)} class-vector sets for {len(self.members)} models")
        per_model = []
        for m, cv in zip(self.members, class_vectors):
            t = time.perf_counter()
            vectors = m.embedder.embed_segments(image, segments)
            if timer:
                t = timer.add("embed", t)
            per_model.append(class_probabilities(vectors, cv, m.scale))
            if timer:
                timer.add("classify", t)
        if len(per_model) == 1:
            return per_model[0]
        t = time.perf_counter()
        out = combine_probabilities(per_model, [m.weight for m in self.members], self.combine)
        if timer:
            timer.add("classify", t)
        return out
