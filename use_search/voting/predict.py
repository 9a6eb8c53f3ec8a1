"""§4.3 voting on one image, with the segmenter and the models in hand."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from use_search.config import VotingSettings
from use_search.model.base import Embedder
from use_search.types import Segment, Segmenter
from use_search.voting.ensemble import Ensemble, StageTimer
from use_search.voting.vote import (
    FALLBACKS,
    SEGMENT_FALLBACK,
    Votes,
    check_class_names,
    fill_nearest,
    vote,
    whole_image_segment,
)


def segment_and_classify(
    pixels: np.ndarray,
    segmenter: Segmenter,
    models: "Embedder | Ensemble",
    class_vectors: np.ndarray | Sequence[np.ndarray],
    timer: StageTimer | None = None,
) -> tuple[list[Segment], np.ndarray]:
    """SAM segments of one image and their (N, C) class probabilities, combined over the models
    (paper §4.3: softmax over the classes of cosine similarity × logit scale; A.2: weighted)."""
    ens = Ensemble.of(models)
    cvs = [class_vectors] if isinstance(class_vectors, np.ndarray) else list(class_vectors)
    t = time.perf_counter()
    segments = segmenter.segment(pixels)
    if timer:
        timer.add("masks", t)
    if not segments:
        return [], np.zeros((0, len(cvs[0])), np.float32)
    return segments, ens.probabilities(pixels, segments, cvs, timer)


def predict_labels(
    pixels: np.ndarray,
    segmenter: Segmenter,
    models: "Embedder | Ensemble",
    class_vectors: np.ndarray | Sequence[np.ndarray],
    *,
    fallback: str = SEGMENT_FALLBACK,
    timer: StageTimer | None = None,
) -> Votes:
    """§4.3 voting on one image, the fallback (``FALLBACKS``) for pixels no segment covers; the
    fallback never changes a covered pixel."""
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; choose one of {', '.join(FALLBACKS)}")
    ens = Ensemble.of(models)
    cvs = [class_vectors] if isinstance(class_vectors, np.ndarray) else list(class_vectors)
    h, w = pixels.shape[:2]
    t = time.perf_counter()
    segments = segmenter.segment(pixels)
    if timer:
        timer.add("masks", t)
    # The whole-image voter is one more segment: every model embeds it with the others, in one call.
    voters = segments + [whole_image_segment(h, w)] if fallback == "image" else segments
    probs = ens.probabilities(pixels, voters, cvs, timer) if voters else np.zeros((0, len(cvs[0])), np.float32)
    t = time.perf_counter()
    fill = None
    if fallback == "image":
        fill, probs = int(probs[-1].argmax()), probs[:-1]
    masks = np.stack([s.mask for s in segments]) if segments else np.zeros((0, h, w), bool)
    uncovered = h * w - int(masks.any(axis=0).sum()) if segments else h * w
    labels = vote(masks, probs, fill)
    if fallback == "nearest":
        labels = fill_nearest(labels)
    if timer:
        timer.add("vote", t)
    return Votes(labels, len(segments), uncovered, fallback)



def segment_by_voting(
    image: np.ndarray,
    classes: Sequence[str],
    segmenter: Segmenter,
    models: "Embedder | Ensemble",
    voting: VotingSettings | None = None,
) -> Votes:
    """Semantic segmentation of one image (H×W×3 uint8) for a class list: segment, embed with every
    model, combine, vote, fall back. ``voting`` (default ``VotingSettings()``) gives the templates,
    the softmax-scale override and the fallback; the models come from ``load_ensemble``."""
    from use_search.model.text import template_set

    v = voting or VotingSettings()
    names = check_class_names(classes)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H×W×3, got {image.shape}")
    ens = Ensemble.of(models).with_logit_scale(v.logit_scale)
    class_vectors = ens.class_vectors(names, template_set(v.templates))
    return predict_labels(image, segmenter, ens, class_vectors, fallback=v.fallback or SEGMENT_FALLBACK)


def semantic_segmentation(
    image: np.ndarray,
    classes: Sequence[str],
    segmenter: Segmenter,
    models: "Embedder | Ensemble",
    voting: VotingSettings | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``segment_by_voting`` as (label map, per-class bool masks keyed by class name)."""
    votes = segment_by_voting(image, classes, segmenter, models, voting)
    return votes.labels, votes.masks(check_class_names(classes))

