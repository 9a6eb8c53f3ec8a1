"""The per-pixel vote of §4.3 and the fallbacks for pixels no segment covers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from use_search.types import Segment

UNLABELED = -1
PIXEL_CHUNK = 1 << 18  # pixels per matrix product: bounds the (classes × pixels) buffer
FALLBACKS = ("nearest", "image", "none")
SEGMENT_FALLBACK = "nearest"  # segment and /segment, unless set: users there want a full label map


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


def check_class_names(classes: Sequence[str]) -> list[str]:
    names = [c.strip() for c in classes]
    if not names or any(not c for c in names):
        raise ValueError("give at least one non-empty class name")
    if len(set(names)) != len(names):
        raise ValueError("class names must be distinct")
    return names

