"""§4.3 voting over an indexed library's stored masks and vectors: no segmenter, no image decode.

Every indexed image already has its segments (COCO RLE in the payload, at the image's own size) and
their vectors. A class list is embedded once; each image then costs one read of its points, a softmax
over the classes per segment (dot products) and the per-pixel vote of ``vote.vote``, run on the runs
of the RLE rather than on pixels: a pixel's label depends only on which segments cover it, and that
set changes only where some segment's run starts or ends, so the image is cut into the intervals
between those boundaries (column-major, as COCO RLE counts) and each distinct set of covering segments votes once. Areas are
exact pixel counts; the work grows with the number of runs, not with the image's size.

Memory holds one image's points at a time (plus the label map, only for the ``nearest`` fallback).
A content indexed under several paths is labelled once, at the record of its first path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from pathlib import PurePosixPath
from typing import Any, Iterator, Sequence

import numpy as np

from use_search.query.search import ModelMismatchError, QueryEmbedder, mismatch_message
from use_search.store.base import ImageEntry, SearchFilter, StoredPoint, StoreError, VectorStore, ancestor_dirs
from use_search.types import point_id
from use_search.voting.combine import class_probabilities
from use_search.voting.vote import UNLABELED, check_class_names, fill_nearest, vote

STORED_FALLBACKS = ("none", "nearest")  # "image" would need a whole-image vector, which is not stored
LABEL_FALLBACK = "none"  # what the stored segments cover, nothing made up
MAX_LABEL_CLASSES = 255  # as /segment: a label map's classes fit a byte with 255 = unlabeled


def rle_counts(rle: dict[str, Any]) -> np.ndarray:
    """The run lengths of a COCO RLE (alternating 0s and 1s, column-major, starting with 0s).

    ``counts`` as a list, or as COCO's compressed string (pycocotools' ``rleFrString``, vectorised):
    each number is a group of characters of 5 bits each (value - 48), a set bit 0x20 meaning "more
    follow"; the last one's bit 0x10 makes it negative; from the third number on, each is a
    difference to the number two before it."""
    counts = rle["counts"]
    if isinstance(counts, (list, tuple)):
        return np.asarray(counts, dtype=np.int64)
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if len(c) == 0:
        return np.zeros(0, np.int64)
    last = np.flatnonzero((c & 0x20) == 0)  # the last character of each number
    first = np.concatenate([[0], last[:-1] + 1])
    group = np.repeat(np.arange(len(last)), last - first + 1)
    shift = 5 * (np.arange(len(c)) - first[group])
    # Sums of at most 2^35: exact in float64.
    x = np.bincount(group, weights=(c & 0x1F) << shift, minlength=len(last)).astype(np.int64)
    negative = (c[last] & 0x10) != 0
    x[negative] -= np.int64(1) << (5 * (last - first + 1))[negative]
    x[3::2] = x[1] + np.cumsum(x[3::2]) if len(x) > 3 else x[3::2]
    x[4::2] = x[2] + np.cumsum(x[4::2]) if len(x) > 4 else x[4::2]
    return x


def rle_runs(rle: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the mask's runs of 1s, as column-major pixel indexes (end exclusive)."""
    ends_all = np.cumsum(rle_counts(rle))
    starts, ends = ends_all[0:-1:2], ends_all[1::2]
    keep = ends > starts
    return starts[keep], ends[keep]


@dataclass
class IntervalVotes:
    """One image's vote, interval by interval (``bounds[j]``..``bounds[j+1]``, column-major)."""

    bounds: np.ndarray  # (I+1,) int64, from 0 to H·W
    covers: np.ndarray  # (N, I) bool: segment i covers interval j
    labels: np.ndarray  # (I,) int32 class index, UNLABELED where no segment covers

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.bounds)

    def label_map(self, height: int, width: int) -> np.ndarray:
        """(H, W) int32: the same label map ``vote`` gives on the decoded masks."""
        return np.repeat(self.labels, self.lengths).reshape(width, height).T


def vote_runs(runs: Sequence[tuple[np.ndarray, np.ndarray]], probs: np.ndarray, n_pixels: int) -> IntervalVotes:
    """§4.3's vote on the runs of N masks: ``vote`` itself, once per interval of constant coverage."""
    cuts = [np.array([0, n_pixels], np.int64)] + [a for s, e in runs for a in (s, e)]
    bounds = np.unique(np.concatenate(cuts))
    at = bounds[:-1]
    covers = np.zeros((len(runs), len(at)), bool)
    for i, (starts, ends) in enumerate(runs):
        k = np.searchsorted(ends, at, side="right")  # the first run ending after the interval's start
        inside = k < len(starts)
        covers[i, inside] = starts[k[inside]] <= at[inside]
    if not runs:
        return IntervalVotes(bounds, covers, np.full(len(at), UNLABELED, np.int32))
    # Many intervals share their set of covering segments: one vote per distinct set.
    packed = np.packbits(covers, axis=0)  # (ceil(N/8), I) uint8
    words = -(-len(packed) // 8)
    keys = np.zeros((len(at), 8 * words), np.uint8)
    keys[:, : len(packed)] = packed.T
    keys = keys.view(np.uint64)  # (I, words): up to 64 segments sort as one integer
    sets, which = np.unique(keys[:, 0] if words == 1 else keys, axis=0, return_inverse=True)
    sets = sets.reshape(len(sets), words).view(np.uint8)[:, : len(packed)]
    distinct = np.unpackbits(sets.T, axis=0, count=len(runs)).astype(bool)  # (N, distinct sets)
    labels = vote(distinct[:, None, :], probs)[0][which.ravel()]
    return IntervalVotes(bounds, covers, labels)


@dataclass
class ClassArea:
    name: str
    index: int
    pixels: int  # pixels labelled with the class
    segments: list[dict[str, Any]]  # {"id", "segment_index", "pixels"}: segments whose pixels voted it in

    def to_json(self) -> dict[str, Any]:
        return {"class": self.name, "index": self.index, "pixels": self.pixels, "segments": self.segments}


@dataclass
class ImageLabels:
    """What the vote says of one indexed image (one content: ``paths`` are its paths, filtered)."""

    sha256: str
    paths: list[str]
    width: int
    height: int
    segments: int  # stored segments that voted
    uncovered_pixels: int  # pixels no segment covers (before the fallback)
    unlabeled_pixels: int  # pixels without a class (after it)
    classes: list[ClassArea]  # the classes present, by class index

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256, "paths": self.paths, "width": self.width, "height": self.height,
            "segments": self.segments, "uncovered_pixels": self.uncovered_pixels,
            "unlabeled_pixels": self.unlabeled_pixels, "classes": [c.to_json() for c in self.classes],
        }


def label_points(points: Sequence[StoredPoint], names: Sequence[str], class_vectors: np.ndarray,
                 logit_scale: float, fallback: str = LABEL_FALLBACK) -> ImageLabels:
    """The vote over one content's stored points (every segment of it), with their class areas."""
    first = points[0].payload
    h, w = int(first["height"]), int(first["width"])
    points = sorted(points, key=lambda p: int(p.payload["segment_index"]))
    probs = class_probabilities(np.stack([p.vector for p in points]), class_vectors, logit_scale)
    iv = vote_runs([rle_runs(p.payload["rle"]) for p in points], probs, h * w)
    lengths = iv.lengths
    covered = iv.labels >= 0
    uncovered = int(lengths[~covered].sum())
    # Pixels of each segment won by each class: over the (segment, interval) pairs of the coverage.
    seg, at = np.nonzero(iv.covers)  # every covered interval has a label
    n, k = len(points), len(names)
    overlap = np.bincount(seg * k + iv.labels[at], weights=lengths[at], minlength=n * k)
    overlap = overlap.round().astype(np.int64).reshape(n, k)  # integer sums below 2^53: exact
    if fallback == "nearest" and uncovered:
        filled = fill_nearest(iv.label_map(h, w)).ravel()
        area = np.bincount(filled[filled >= 0], minlength=len(names))
    else:
        area = np.bincount(iv.labels[covered], weights=lengths[covered], minlength=len(names)).round().astype(np.int64)
    classes = [
        ClassArea(name, c, int(area[c]), [
            {"id": p.id, "segment_index": int(p.payload["segment_index"]), "pixels": int(overlap[i, c])}
            for i, p in enumerate(points) if overlap[i, c] > 0
        ])
        for c, name in enumerate(names) if area[c] > 0
    ]
    return ImageLabels(first["sha256"], list(first.get("paths") or []), w, h, len(points), uncovered,
                       h * w - int(area.sum()), classes)


@dataclass
class LabelTotals:
    """Per-class sums over the images labelled so far."""

    names: list[str]
    images: int = 0
    pixels: int = 0
    class_images: list[int] = field(default_factory=list)
    class_pixels: list[int] = field(default_factory=list)
    class_segments: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.names)
        self.class_images, self.class_pixels, self.class_segments = [0] * n, [0] * n, [0] * n

    def add(self, image: ImageLabels) -> None:
        self.images += 1
        self.pixels += image.width * image.height
        for c in image.classes:
            self.class_images[c.index] += 1
            self.class_pixels[c.index] += c.pixels
            self.class_segments[c.index] += len(c.segments)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"class": n, "images": self.class_images[i], "pixels": self.class_pixels[i],
             "segments": self.class_segments[i]}
            for i, n in enumerate(self.names)
        ]


def check_classes(classes: Sequence[str]) -> list[str]:
    names = check_class_names(classes)
    if len(names) > MAX_LABEL_CLASSES:
        raise ValueError(f"at most {MAX_LABEL_CLASSES} classes, got {len(names)}")
    return names


class Labeler:
    """Labels the images of one store with a class list from their stored segments (``use-search label``,
    HTTP ``POST /label``). ``embedder``: the store's model's text side; ``logit_scale``: its softmax scale."""

    def __init__(self, store: VectorStore, embedder: QueryEmbedder, logit_scale: float,
                 templates: Sequence[str] | None = None, fallback: str = LABEL_FALLBACK) -> None:
        if fallback not in STORED_FALLBACKS:
            raise ValueError(
                f"fallback {fallback!r} is not available for stored segments; choose one of "
                f"{', '.join(STORED_FALLBACKS)} (the whole image has no stored vector)"
            )
        self.store, self.embedder, self.logit_scale = store, embedder, logit_scale
        self.templates, self.fallback = templates, fallback

    def check(self, under: str | None = None) -> None:
        """Fail before any work: an empty store, a folder with nothing indexed, another model's vectors."""
        dim = self.store.dim
        if dim is None or self.store.count_segments() == 0:
            raise StoreError("the store is empty: index images first")
        if under is not None and self.store.count_segments(SearchFilter(under=under)) == 0:
            raise StoreError(f"nothing is indexed under {under}")
        if dim != self.embedder.dim:
            raise ModelMismatchError(mismatch_message("another model", self.embedder.model_id, (dim, self.embedder.dim)))

    def class_vectors(self, names: Sequence[str]) -> np.ndarray:
        return self.embedder.embed_texts(list(names), self.templates)

    def records(self, under: str | None = None, offset: int = 0) -> Iterator[ImageEntry]:
        """The image records (one per path), under a folder, from the ``offset``-th on (store order)."""
        folder = None if under is None else str(PurePosixPath(under))
        found = (e for e in self.store.iter_images() if folder is None or folder in ancestor_dirs(e.path))
        return islice(found, offset, None)

    def label_record(self, entry: ImageEntry, names: Sequence[str], class_vectors: np.ndarray,
                     under: str | None = None) -> ImageLabels | None:
        """The labels of the record's content, or None where the content is labelled at another record
        (its first path, among those under ``under``) or has no points."""
        points = self.store.read_points([point_id(entry.sha256, i) for i in range(entry.n_segments)])
        if not points:
            return None
        paths = list(points[0].payload.get("paths") or [entry.path])
        if under is not None:
            folder = str(PurePosixPath(under))
            paths = [p for p in paths if folder in ancestor_dirs(p)]
        if entry.path != min(paths, default=entry.path):
            return None
        foreign = {p.payload.get("model") for p in points} - {self.embedder.model_id}
        if foreign:
            raise ModelMismatchError(mismatch_message(", ".join(f"'{m}'" for m in sorted(map(str, foreign))),
                                                      self.embedder.model_id))
        out = label_points(points, names, class_vectors, self.logit_scale, self.fallback)
        out.paths = paths
        return out
