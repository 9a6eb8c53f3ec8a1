"""Semantic segmentation by voting (paper §4.3), with model ensembles (appendix A.2).

Class-agnostic masks (SAM, point grid + NMS) are computed once per image and embedded by every model
of the ensemble; each model turns its segment embeddings into a softmax over the target classes of
(cosine similarity × its logit scale); the models' probabilities are combined per segment with their
weights (by default OVSeg's weighted geometric mean, as A.2 says); every pixel sums the combined
probabilities of the segments that cover it and takes the class with the highest total. Pixels no
segment covers get the fallback (``VotingSettings.fallback``): the nearest labelled pixel's class,
the class of the whole image taken as one more segment, or none (``UNLABELED``: -1 in the label map,
255 in a label PNG). §4.3 says nothing of them: ``eval semseg`` leaves them unlabeled by default
(``eval.semseg.EVAL_FALLBACK``), ``segment`` fills them (``SEGMENT_FALLBACK``).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from use_search.config import Settings, VotingSettings
from use_search.model.base import Embedder
from use_search.types import Segment, Segmenter

UNLABELED = -1
UNLABELED_PNG = 255
CLIP_LOGIT_SCALE = 100.0  # CLIP's learned logit scale (saturated at 100): crop-CLIP's softmax scale
PIXEL_CHUNK = 1 << 18  # pixels per matrix product: bounds the (classes × pixels) buffer
COMBINE_MODES = ("ovseg", "mean", "geometric")
FALLBACKS = ("nearest", "image", "none")
SEGMENT_FALLBACK = "nearest"  # segment and /segment, unless set: users there want a full label map


class StageTimer(Protocol):
    """Adds the seconds since ``start`` to ``stage`` and returns the time now (``eval.common.Timer``)."""

    def add(self, stage: str, start: float) -> float: ...


def class_probabilities(
    segment_vectors: np.ndarray, class_vectors: np.ndarray, logit_scale: float = CLIP_LOGIT_SCALE
) -> np.ndarray:
    """(N, D) segment embeddings × (C, D) class text embeddings → (N, C) softmax over classes of
    cosine × ``logit_scale``. Rows are normalised here, so unnormalised inputs are fine."""
    s = np.asarray(segment_vectors, dtype=np.float64)
    t = np.asarray(class_vectors, dtype=np.float64)
    if s.ndim != 2 or t.ndim != 2 or s.shape[1] != t.shape[1]:
        raise ValueError(f"embedding shapes do not match: segments {s.shape}, classes {t.shape}")
    s = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    logits = logit_scale * (s @ t.T)
    logits -= logits.max(axis=1, keepdims=True) if len(logits) else 0.0
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def ovseg_exponents(weights: Sequence[float]) -> list[float]:
    """The exponents of OVSeg's ensemble ``p₀^(1-λ) · p₁^λ`` for A.2's weights (``PATH:WEIGHT``).

    The first model is the base (A.2: the curated-data model, weight 1); each other model's weight
    relative to it is its exponent λᵢ, and the base gets 1 - Σ λᵢ. So weights 1 and 0.25 give
    p₀^0.75 · p₁^0.25. The λᵢ must sum below 1 (the base keeps a positive exponent).
    """
    if len(weights) < 2:
        return [1.0] * len(weights)
    lams = [w / weights[0] for w in weights[1:]]
    if sum(lams) >= 1:
        raise ValueError(
            f"combine 'ovseg': the other models' weights relative to the first ({', '.join(f'{w:g}' for w in weights)}) "
            f"are exponents that must sum below 1 (A.2: the curated-data model first at 1, e.g. PATH:1 PATH:0.25); "
            "list the base model first or use combine 'mean'"
        )
    return [1.0 - sum(lams), *lams]


def combine_probabilities(probs: Sequence[np.ndarray], weights: Sequence[float], mode: str = "ovseg") -> np.ndarray:
    """Per-segment class probabilities of several models, (N, C) each → one (N, C).

    ``ovseg`` (A.2, "same as OVSeg"): OVSeg's weighted geometric mean Πᵢ pᵢ^eᵢ with the exponents of
    ``ovseg_exponents`` (two models: p₀^(1-λ) · p₁^λ), not renormalised: a segment on which the models
    disagree keeps less mass in the per-pixel sum.
    ``mean``: Σᵢ wᵢ·pᵢ / Σᵢ wᵢ. ``geometric``: Πᵢ pᵢ^(wᵢ/Σ w), each row renormalised to sum to 1
    (other exponents than ``ovseg`` for the same weights, and every segment votes with mass 1).
    All reduce to the model itself for one model.
    """
    if len(probs) != len(weights) or not probs:
        raise ValueError(f"{len(probs)} probability arrays but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or (w <= 0).any():
        raise ValueError(f"ensemble weights must be positive numbers, got {list(weights)}")
    p = np.stack([np.asarray(x, dtype=np.float64) for x in probs])  # (M, N, C); raises on unequal shapes
    if mode == "ovseg":
        out = np.prod(p ** np.asarray(ovseg_exponents(list(w)))[:, None, None], axis=0)
    elif mode == "mean":
        out = np.tensordot(w / w.sum(), p, axes=1)
    elif mode == "geometric":
        out = np.exp(np.tensordot(w / w.sum(), np.log(np.maximum(p, 1e-300)), axes=1))
        out /= np.maximum(out.sum(axis=-1, keepdims=True), 1e-300)
    else:
        raise ValueError(f"unknown ensemble combination {mode!r}; choose one of {', '.join(COMBINE_MODES)}")
    return out.astype(np.float32)


def vote(masks: np.ndarray | Sequence[np.ndarray], probs: np.ndarray, fill: int | None = None) -> np.ndarray:
    """(N, H, W) bool masks and (N, C) per-segment class probabilities → (H, W) int32 labels.

    Each pixel's score for class c is the sum of ``probs[i, c]`` over the segments i covering it; the
    label is the argmax (ties → the lower class index). Pixels no segment covers get ``fill`` (None:
    ``UNLABELED``).
    """
    m = np.asarray(masks, dtype=bool)
    p = np.asarray(probs, dtype=np.float32)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {m.shape}")
    n, h, w = m.shape
    if p.ndim != 2 or p.shape[0] != n:
        raise ValueError(f"probs must be (N={n}, C), got {p.shape}")
    labels = np.full(h * w, UNLABELED if fill is None else fill, dtype=np.int32)
    if n == 0 or p.shape[1] == 0:
        return labels.reshape(h, w)
    flat = m.reshape(n, h * w)
    covered = flat.any(axis=0)
    pt = p.T  # (C, N)
    for start in range(0, h * w, PIXEL_CHUNK):
        block = flat[:, start : start + PIXEL_CHUNK]
        scores = pt @ block.astype(np.float32)  # (C, chunk): summed probabilities per class
        chunk = slice(start, start + block.shape[1])
        labels[chunk] = np.where(covered[chunk], scores.argmax(axis=0), labels[chunk])
    return labels.reshape(h, w)


def fill_nearest(labels: np.ndarray) -> np.ndarray:
    """``UNLABELED`` pixels take the label of the nearest labelled pixel (Euclidean; a label map with
    no labelled pixel is returned as it is)."""
    from scipy import ndimage

    missing = labels < 0
    if not missing.any() or missing.all():
        return labels
    idx = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
    return labels[tuple(idx)]


def class_masks(labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """One bool mask per class index from a label map."""
    return [labels == c for c in range(n_classes)]


def whole_image_segment(height: int, width: int) -> Segment:
    return Segment(mask=np.ones((height, width), bool), bbox=(0, 0, width, height), area=height * width,
                   source="whole-image")


# ---------------------------------------------------------------------------------------------------
# Ensembles (A.2)


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


def load_ensemble(settings: Settings, default: Embedder | None = None) -> Ensemble:
    """The voting models of ``settings.voting.models`` (each USE checkpoint loaded once, on the
    settings' device), or, when none are listed, ``default`` / the one configured embedder."""
    from use_search.factory import Runtime

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


# ---------------------------------------------------------------------------------------------------
# One image


@dataclass
class Votes:
    """The label map of one image and what the fallback had to do."""

    labels: np.ndarray  # (H, W) int32 class indices, UNLABELED = -1
    segments: int  # SAM segments that voted
    uncovered_pixels: int  # pixels no segment covers (before the fallback)
    fallback: str  # what labelled them (``FALLBACKS``)

    @property
    def unlabeled_pixels(self) -> int:
        """Pixels still without a label (after the fallback)."""
        return int((self.labels < 0).sum())

    def masks(self, classes: Sequence[str]) -> dict[str, np.ndarray]:
        return dict(zip(classes, class_masks(self.labels, len(classes))))


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


def check_class_names(classes: Sequence[str]) -> list[str]:
    names = [c.strip() for c in classes]
    if not names or any(not c for c in names):
        raise ValueError("give at least one non-empty class name")
    if len(set(names)) != len(names):
        raise ValueError("class names must be distinct")
    return names


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


def _palette() -> list[int]:
    """Distinct colours for indices 0..254 (golden-angle hues), black for 255 (unlabeled)."""
    import colorsys

    pal: list[int] = []
    for i in range(256):
        if i == UNLABELED_PNG:
            pal += [0, 0, 0]
            continue
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.25 * (i % 3 == 2))
        pal += [int(r * 255), int(g * 255), int(b * 255)]
    return pal


def label_png(labels: np.ndarray) -> bytes:
    """Label map → PNG whose pixel values are the class indices, 255 = unlabeled.

    Up to 255 classes: an 8-bit palette PNG (values readable as indices, colours viewable); more:
    a 16-bit greyscale PNG with 65535 = unlabeled.
    """
    lab = np.asarray(labels)
    buf = io.BytesIO()
    if lab.max(initial=-1) < UNLABELED_PNG:
        arr = np.where(lab < 0, UNLABELED_PNG, lab).astype(np.uint8)
        img = Image.fromarray(arr)  # "L"; putpalette makes it "P" with the same indices
        img.putpalette(_palette())
        img.save(buf, format="PNG")
    else:
        arr = np.where(lab < 0, 65535, lab).astype(np.uint16)
        Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def read_label_png(data: bytes) -> np.ndarray:
    """Inverse of ``label_png``: (H, W) int32 with ``UNLABELED`` restored."""
    img = Image.open(io.BytesIO(data))
    arr = np.asarray(img).astype(np.int32)
    unl = UNLABELED_PNG if img.mode == "P" else 65535
    arr[arr == unl] = UNLABELED
    return arr
