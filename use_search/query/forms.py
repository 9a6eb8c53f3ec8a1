"""Query forms beyond one text: more like this, negatives, several things in one photo, one row per image.

Every form is run by the store's engine (``VectorStore.query`` / ``query_batch`` / ``query_groups``:
nearest, recommend with positives and negatives, filters, group-by), never by a scan of the points.
Scores (``VectorQuery``): ``(Σ cos to positives − Σ cos to negatives) / number of positives``, so a
single text or a single example is its plain cosine, text + example their mean cosine, and each ``--not``
phrase subtracts its cosine (divided the same way). This is the engine's ``sum_scores`` recommend
strategy, rescaled; ``min_score`` applies to that score.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from use_search.query.search import ModelMismatchError, Searcher, dedup_hits, mismatch_message
from use_search.store.base import SearchFilter, StoreError, VectorQuery
from use_search.types import Hit, Segment


class QueryInputError(ValueError):
    """The query cannot be run as asked (an unknown segment id, a point no mask covers, too many phrases)."""


class UnknownSegmentError(QueryInputError):
    """A ``like`` example names a segment id the store does not hold."""


@dataclass
class Ask:
    """What to look for: texts and example segments (positives), texts to avoid (negatives).

    ``like``: ids of stored segments; ``like_vectors``: example vectors embedded elsewhere (an uploaded
    image's segment). A ``like`` example's own segment is always left out of the results;
    ``other_images`` also leaves out every segment of its image."""

    texts: list[str] = field(default_factory=list)
    like: list[str] = field(default_factory=list)
    like_vectors: list[np.ndarray] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    other_images: bool = False
    flt: SearchFilter | None = None
    min_score: float | None = None
    max_items: int = 8  # texts, examples, negatives: each at most this many (settings.query.max_phrases)


@dataclass
class ImageMatch:
    """One image of an image-level result: its score and the segments that earned it.

    ``--group image``: ``segments`` are its best segments, ``score`` the first one's. ``--all``:
    ``segments[i]`` is its best segment for ``phrases[i]`` and ``score`` the weakest of those."""

    sha256: str
    path: str
    score: float
    segments: list[Hit]
    phrases: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "sha256": self.sha256, "path": self.path, "score": self.score,
            "segments": [h.to_json() for h in self.segments],
            **({"phrases": self.phrases} if self.phrases else {}),
        }


def check_count(what: str, items: Sequence[object], most: int) -> None:
    if len(items) > most:
        raise QueryInputError(f"{what}: at most {most} (got {len(items)})")


def build(searcher: Searcher, ask: Ask) -> VectorQuery:
    """The engine query for ``ask``. Cost: one text-tower call for all its texts, one store read (``read_points``,
    vectors of the ``like`` examples) when there are examples."""
    for what, items in (("texts", ask.texts), ("like examples", ask.like + ask.like_vectors), ("negatives", ask.negatives)):
        check_count(what, items, ask.max_items)
    searcher.check_store()
    texts = embed_all(searcher, [*ask.texts, *ask.negatives])
    positives = texts[: len(ask.texts)] + list(ask.like_vectors)
    examples = []
    if ask.like:
        found = {p.id: p for p in searcher.store.read_points(list(dict.fromkeys(ask.like)))}
        missing = [i for i in ask.like if i not in found]
        if missing:
            raise UnknownSegmentError(f"no segment with id {', '.join(missing)} in the store")
        examples = [found[i] for i in dict.fromkeys(ask.like)]
        positives += [p.vector for p in examples]
    if not positives:
        raise QueryInputError("give a text or a segment to look like")
    return VectorQuery(
        positives=tuple(positives),
        negatives=tuple(texts[len(ask.texts):]),
        flt=None if ask.flt is None or ask.flt.is_empty() else ask.flt,
        exclude_ids=tuple(p.id for p in examples),
        exclude_shas=tuple(dict.fromkeys(p.payload["sha256"] for p in examples)) if ask.other_images else (),
    )


def embed_all(searcher: Searcher, texts: Sequence[str]) -> list[np.ndarray]:
    """Every text's vector from one text-tower call (one batch), none when there is no text."""
    return list(searcher.embedder.embed_texts(list(texts))) if texts else []


def _checked(searcher: Searcher, hits: Sequence[Hit]) -> None:
    foreign = {h.model for h in hits if h.model != searcher.embedder.model_id}
    if foreign:
        raise ModelMismatchError(mismatch_message(", ".join(f"'{m}'" for m in sorted(foreign)), searcher.embedder.model_id))


def segments(searcher: Searcher, ask: Ask, k: int = 10, dedup: bool = False) -> list[Hit]:
    """The ``k`` best segments for ``ask``. Cost: ``build`` + one engine query (nearest for one
    positive, recommend otherwise) returning ``k`` points (``4k`` with ``dedup``)."""
    if k < 1:
        raise QueryInputError("k must be at least 1")
    q = build(searcher, ask)
    hits = searcher.store.query(q, k * 4 if dedup else k, ask.min_score)
    _checked(searcher, hits)
    return dedup_hits(hits, k) if dedup else hits[:k]


def images(searcher: Searcher, ask: Ask, k: int = 10, per_image: int = 3) -> list[ImageMatch]:
    """One row per image, ranked by its best segment, with its ``per_image`` best segments. Cost:
    ``build`` + the engine's group-by (server: one ``query_points_groups``; embedded: see
    ``store.edge_query``), ``k × per_image`` points returned."""
    if k < 1 or per_image < 1:
        raise QueryInputError("k and the segments per image must be at least 1")
    groups = searcher.store.query_groups(build(searcher, ask), k, per_image, ask.min_score)
    for g in groups:
        _checked(searcher, g)
    return [ImageMatch(g[0].sha256, g[0].path, g[0].score, g) for g in groups if g]


def all_of(
    searcher: Searcher,
    phrases: Sequence[str],
    none: Sequence[str] = (),
    k: int = 10,
    flt: SearchFilter | None = None,
    min_score: float | None = None,
    candidates: int = 1000,
    max_phrases: int = 8,
) -> list[ImageMatch]:
    """Images with a segment for every phrase, scored by their weakest phrase's best segment; images
    with a segment scoring at least ``min_score`` for a ``none`` phrase are dropped.

    Bound: each phrase's candidates are its ``candidates`` best segments (one batched engine query,
    reading only ``sha256``). An image is found only if, for every phrase, one of its segments is
    among that phrase's candidates: an image whose segment for one phrase ranks below ``candidates``
    other segments for it (a common thing in a large store) is missed, even though it has every phrase.
    ``none`` is exact for the images found: one group-by query per ``none`` phrase restricted to them.

    Cost: one text-tower call (all phrases in one batch); store calls: 1 batch (``len(phrases) × candidates`` points,
    sha256 only) + 1 group-by per ``none`` phrase (restricted to the found images) + 1 retrieve of
    the ``≤ k × len(phrases)`` chosen segments."""
    if not phrases:
        raise QueryInputError("give at least one phrase that every image must show")
    check_count("phrases", phrases, max_phrases)
    check_count("none phrases", none, max_phrases)
    if none and min_score is None:
        raise QueryInputError("--none needs --min-score: an image is dropped when a segment scores at least that for a none phrase")
    if k < 1:
        raise QueryInputError("k must be at least 1")
    searcher.check_store()
    flt = None if flt is None or flt.is_empty() else flt
    vectors = embed_all(searcher, [*phrases, *none])
    found = searcher.store.query_batch([VectorQuery((v,), flt=flt) for v in vectors[: len(phrases)]], candidates, min_score)
    best: list[dict[str, tuple[str, float]]] = []
    for points in found:
        per_image: dict[str, tuple[str, float]] = {}
        for p in points:  # best first: the first point of an image is its best
            per_image.setdefault(p.sha256, (p.id, p.score))
        best.append(per_image)
    shared = set.intersection(*(set(b) for b in best))
    for vector in vectors[len(phrases):]:
        if shared:
            q = VectorQuery((vector,), only_shas=tuple(sorted(shared)))
            shared -= {g[0].sha256 for g in searcher.store.query_groups(q, len(shared), 1, min_score) if g}
    ranked = sorted(shared, key=lambda s: (-min(b[s][1] for b in best), s))[:k]
    ids = list(dict.fromkeys(b[s][0] for s in ranked for b in best))
    stored = {h.id: h for h in searcher.store.get_segments(ids)}
    _checked(searcher, list(stored.values()))
    out = []
    for sha in ranked:
        hits = [replace(stored[b[sha][0]], score=b[sha][1]) for b in best]
        out.append(ImageMatch(sha, hits[0].path, min(h.score for h in hits), hits, list(phrases)))
    return out


# More like an image that is not in the store ------------------------------------------------------
def whole_image(height: int, width: int) -> Segment:
    return Segment(np.ones((height, width), bool), (0, 0, width, height), height * width, source="whole-image")


def segment_at(segments: Sequence[Segment], x: int, y: int) -> Segment:
    """The smallest segment whose mask covers pixel (x, y) of the image the masks are on (the most
    specific of nested masks); ``QueryInputError`` when none does or the point is outside."""
    if not segments:
        raise QueryInputError("the segmenter found no segment in the image")
    h, w = segments[0].mask.shape
    if not (0 <= x < w and 0 <= y < h):
        raise QueryInputError(f"point {x},{y} is outside the image ({w}×{h} pixels)")
    covering = [s for s in segments if s.mask[y, x]]
    if not covering:
        raise QueryInputError(f"no segment covers pixel {x},{y}: pick a point on an object, or leave the point out for the whole image")
    return min(covering, key=lambda s: s.area)


def image_vector(pixels: np.ndarray, embedder, segmenter=None, point: tuple[int, int] | None = None,  # type: ignore[no-untyped-def]
                 original: tuple[int, int] | None = None) -> np.ndarray:
    """The vector of an image's segment, by the store's model: the whole image when ``point`` is None,
    else the segment under ``point`` (x, y in the original's pixels; ``original`` = its (height, width)
    when ``pixels`` is the image at the working size). Cost: one segmenter run (with a point) and one
    embedder call; no store call."""
    h, w = pixels.shape[:2]
    if point is None:
        chosen = whole_image(h, w)
    else:
        oh, ow = original or (h, w)
        x, y = point
        if not (0 <= x < ow and 0 <= y < oh):
            raise QueryInputError(f"point {x},{y} is outside the image ({ow}×{oh} pixels)")
        chosen = segment_at(segmenter.segment(pixels), min(w - 1, x * w // ow), min(h - 1, y * h // oh))
    return np.asarray(embedder.embed_segments(pixels, [chosen])[0], dtype=np.float32)


def upload_vector(data: bytes, embedder, segmenter, point: tuple[int, int] | None,  # type: ignore[no-untyped-def]
                  max_pixels: int, work_side: int | None) -> np.ndarray:
    """``image_vector`` of an image file's bytes, decoded at the working size (setting ``work_side``,
    else the segmenter's input size), as the indexer sees it."""
    from use_search.imaging import decode_work, working_side

    img = decode_work(data, max_pixels, working_side(segmenter, work_side))
    return image_vector(img.pixels, embedder, segmenter, point, (img.height, img.width))


def parse_image_point(value: str) -> tuple[str, tuple[int, int] | None]:
    """``FILE`` or ``FILE@X,Y`` (the segment under pixel X,Y) → (file, point or None)."""
    import re

    m = re.fullmatch(r"(.+)@(\d+),(\d+)", value)
    return (m.group(1), (int(m.group(2)), int(m.group(3)))) if m else (value, None)


__all__ = [
    "Ask", "ImageMatch", "QueryInputError", "StoreError", "UnknownSegmentError",
    "all_of", "build", "image_vector", "images", "parse_image_point", "segment_at", "segments", "upload_vector",
]
