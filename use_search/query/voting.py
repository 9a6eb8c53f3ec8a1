"""Semantic segmentation by voting (paper §4.3).

Class-agnostic masks (SAM, point grid + NMS) are embedded; each segment gets a softmax over the
target classes of (cosine similarity × logit scale); every pixel sums the probabilities of the
segments that cover it and takes the class with the highest total. Pixels no segment covers are
``UNLABELED`` (-1 in the label map, 255 in a label PNG).
"""

from __future__ import annotations

import io
import time
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from use_search.model.base import Embedder
from use_search.types import Segment, Segmenter

UNLABELED = -1
UNLABELED_PNG = 255
DEFAULT_LOGIT_SCALE = 100.0  # CLIP's learned temperature saturates at 100
PIXEL_CHUNK = 1 << 18  # pixels per matrix product: bounds the (classes × pixels) buffer


class StageTimer(Protocol):
    """Adds the seconds since ``start`` to ``stage`` and returns the time now (``eval.common.Timer``)."""

    def add(self, stage: str, start: float) -> float: ...


def class_probabilities(
    segment_vectors: np.ndarray, class_vectors: np.ndarray, logit_scale: float = DEFAULT_LOGIT_SCALE
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


def vote(masks: np.ndarray | Sequence[np.ndarray], probs: np.ndarray) -> np.ndarray:
    """(N, H, W) bool masks and (N, C) per-segment class probabilities → (H, W) int32 labels.

    Each pixel's score for class c is the sum of ``probs[i, c]`` over the segments i covering it; the
    label is the argmax (ties → the lower class index), ``UNLABELED`` where no segment covers it.
    """
    m = np.asarray(masks, dtype=bool)
    p = np.asarray(probs, dtype=np.float32)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {m.shape}")
    n, h, w = m.shape
    if p.ndim != 2 or p.shape[0] != n:
        raise ValueError(f"probs must be (N={n}, C), got {p.shape}")
    labels = np.full(h * w, UNLABELED, dtype=np.int32)
    if n == 0 or p.shape[1] == 0:
        return labels.reshape(h, w)
    flat = m.reshape(n, h * w)
    covered = flat.any(axis=0)
    pt = p.T  # (C, N)
    for start in range(0, h * w, PIXEL_CHUNK):
        block = flat[:, start : start + PIXEL_CHUNK]
        scores = pt @ block.astype(np.float32)  # (C, chunk): summed probabilities per class
        labels[start : start + block.shape[1]] = scores.argmax(axis=0)
    labels[~covered] = UNLABELED
    return labels.reshape(h, w)


def class_masks(labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """One bool mask per class index from a label map."""
    return [labels == c for c in range(n_classes)]


def segment_and_classify(
    pixels: np.ndarray,
    segmenter: Segmenter,
    embedder: Embedder,
    class_vectors: np.ndarray,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    timer: StageTimer | None = None,
) -> tuple[list[Segment], np.ndarray]:
    """SAM segments of one image and their (N, C) class probabilities (paper §4.3: softmax over the
    classes of cosine similarity × logit scale)."""
    t = time.perf_counter()
    segments = segmenter.segment(pixels)
    if timer:
        t = timer.add("masks", t)
    if not segments:
        return [], np.zeros((0, len(class_vectors)), np.float32)
    vectors = embedder.embed_segments(pixels, segments)
    if timer:
        t = timer.add("embed", t)
    probs = class_probabilities(vectors, class_vectors, logit_scale)
    if timer:
        timer.add("classify", t)
    return segments, probs


def predict_labels(
    pixels: np.ndarray,
    segmenter: Segmenter,
    embedder: Embedder,
    class_vectors: np.ndarray,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    timer: StageTimer | None = None,
) -> tuple[np.ndarray, int]:
    """(H, W) int32 label map by §4.3 voting (``UNLABELED`` where no segment covers) and the segment count."""
    segments, probs = segment_and_classify(pixels, segmenter, embedder, class_vectors, logit_scale, timer)
    h, w = pixels.shape[:2]
    if not segments:
        return np.full((h, w), UNLABELED, np.int32), 0
    t = time.perf_counter()
    labels = vote(np.stack([s.mask for s in segments]), probs)
    if timer:
        timer.add("vote", t)
    return labels, len(segments)


def semantic_segmentation(
    image: np.ndarray,
    classes: Sequence[str],
    segmenter: Segmenter,
    embedder: Embedder,
    templates: Sequence[str] | None = None,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Segment ``image`` (H×W×3 uint8), embed segments and class names, vote.

    Returns the (H, W) int32 label map (class indices into ``classes``, ``UNLABELED`` = -1) and the
    per-class bool masks keyed by class name, in the order of ``classes``.
    """
    names = [c.strip() for c in classes]
    if not names or any(not c for c in names):
        raise ValueError("give at least one non-empty class name")
    if len(set(names)) != len(names):
        raise ValueError("class names must be distinct")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H×W×3, got {image.shape}")
    labels, _ = predict_labels(image, segmenter, embedder, embedder.embed_texts(names, templates), logit_scale)
    return labels, dict(zip(names, class_masks(labels, len(names))))


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
