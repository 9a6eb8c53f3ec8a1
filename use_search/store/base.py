"""The ``VectorStore`` interface: segments belong to content, paths are references to content.

Two collections live side by side:
- segments: one point per segment of one *content* (the file's sha256), id ``point_id(sha256,
  segment_index)``, the segment vector, and a payload (``segment_payload``): ``sha256``, ``paths`` (every
  indexed path whose file has this content, sorted), ``dirs`` (every ancestor folder of those paths),
  width/height, segment_index, n_segments, COCO RLE, bbox, area, scores, source, model, time. The same
  photo under three paths is one set of points listing three paths; path and folder filters match
  any element of ``paths`` / ``dirs`` (keyword payload indexes on both, and on ``sha256``).
- images: one record per path, id ``image_id(path)``, a payload ``ImageEntry`` (path, sha256, ...).

Agreement between the two (what ``store check`` verifies): for every record (path P, content S, n
segments), the points with ``sha256 == S`` are exactly segment indexes 0..n-1 and each lists P in
``paths``; every path a point lists has a record with that point's content, and ``dirs`` is the union
of the ancestors of ``paths``. Points whose content no record names are left-overs of an interrupted run
(``prune`` drops them).

Write order keeps that true across a crash: a content's points are written (or made to list the new
path) before the path's record, and a record is deleted before its reference. So a record always
means "complete and listed"; an interrupted run leaves at most a reference or points without a
record, which a rerun of that path overwrites and ``prune`` clears. A content's points are deleted only
when no path refers to it any more.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np

from use_search.types import Hit, SegmentPoint, point_id

IMAGE_NAMESPACE = uuid.UUID("0d6c8a51-2b7e-4f8e-9c3a-54a1b7e90c42")

# Payload fields with an index (keyword). Segments: the paths referring to the content (an array: a
# condition matches any element), the content hash, and every ancestor folder of those paths (``dirs``)
# so "everything under /photos/2024" is an indexed exact match, not a string scan. Image records: one
# path each.
SEGMENT_INDEXED_FIELDS = ("paths", "sha256", "dirs")
IMAGE_INDEXED_FIELDS = ("path", "sha256", "dirs")
LEGACY_PATH_FIELD = "path"  # segments written before content addressing: one path per point, indexed
# What a search can leave out of its hits: the COCO RLE mask (~770 bytes of a point's ~1.3 KB payload),
# which only drawing, --json and the mask route need; ``VectorStore.with_masks`` fetches it by id.
MASK_FIELDS = ("rle",)


def image_id(path: str) -> str:
    return str(uuid.uuid5(IMAGE_NAMESPACE, path))


def ancestor_dirs(path: str) -> list[str]:
    return [str(p) for p in PurePosixPath(path).parents]


def references(paths: Iterable[str]) -> dict[str, list[str]]:
    """The reference fields of a content's points: its paths and all their ancestor folders, sorted."""
    paths = sorted(set(paths))
    return {"paths": paths, "dirs": sorted({d for p in paths for d in ancestor_dirs(p)})}


class StoreError(RuntimeError):
    """The store cannot be used (unreachable server, locked embedded store, wrong dimension...)."""


class StoreDamagedError(StoreError):
    """The engine failed on the store's files after they were opened (corrupt payload, vector or index
    files); the message names the commands that check, repair or restore the store, ``detail`` is the
    engine's own words."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class StoreFullError(StoreError):
    """The embedded store's disk has less free space than a write needs plus the safety margin."""


@dataclass(frozen=True)
class ImageEntry:
    path: str
    sha256: str
    width: int
    height: int
    n_segments: int
    model: str
    indexed_at: str  # ISO 8601, UTC
    filename: str | None = None  # an upload's original file name (the API stores uploads by hash)
    # The file as it was read (``os.stat``): a rerun skips a file whose size and mtime still match
    # without opening it. None: unknown (records written before these fields, or uploads).
    size: int | None = None
    mtime_ns: int | None = None

    def payload(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if v is not None or k not in OPTIONAL_IMAGE_FIELDS}
        return {**fields, "dirs": ancestor_dirs(self.path)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "ImageEntry":
        return cls(**{k: payload[k] for k in cls.__dataclass_fields__ if k in payload})

    def matches_stat(self, size: int, mtime_ns: int) -> bool:
        """Same size and modification time as recorded: the file is taken as unchanged."""
        return self.size is not None and self.size == size and self.mtime_ns == mtime_ns


OPTIONAL_IMAGE_FIELDS = ("filename", "size", "mtime_ns")  # left out of the payload when None


@dataclass(frozen=True)
class StoredPoint:
    id: str
    vector: np.ndarray  # float32, as the engine returns it (cosine collections store it normalised)
    payload: dict[str, Any]


@dataclass(frozen=True)
class SearchFilter:
    """Restrict a search to one image path and/or to the images under a folder."""

    path: str | None = None
    under: str | None = None  # a folder: matches every path below it (via the ``dirs`` payload)
    sha256: str | None = None

    def is_empty(self) -> bool:
        return self.path is None and self.under is None and self.sha256 is None

    def conditions(self, path_field: str = "paths") -> list[tuple[str, str]]:
        """(field, exact value) pairs, all of which must match (an array field: any of its elements).
        ``path_field``: ``paths`` on segments, ``path`` on image records."""
        out = []
        if self.path is not None:
            out.append((path_field, self.path))
        if self.under is not None:
            out.append(("dirs", str(PurePosixPath(self.under))))
        if self.sha256 is not None:
            out.append(("sha256", self.sha256))
        return out


@dataclass(frozen=True)
class VectorQuery:
    """One engine query over the segments: nearest to a single positive vector, or the engine's
    recommend (``sum_scores`` strategy) over several positives and/or negatives.

    Score of a point x: ``(Σ_p cos(x, p) − Σ_n cos(x, n)) / len(positives)``: the engine's sum_scores
    divided by the number of positives, so one positive and no negative is exactly the cosine, several
    positives their mean cosine, and each negative subtracts its cosine (scaled the same way).
    ``exclude_ids`` / ``exclude_shas`` leave points / whole contents out; ``only_shas`` keeps only
    those contents (all are indexed payload conditions, evaluated by the engine)."""

    positives: tuple[np.ndarray, ...]
    negatives: tuple[np.ndarray, ...] = ()
    flt: SearchFilter | None = None
    exclude_ids: tuple[str, ...] = ()
    exclude_shas: tuple[str, ...] = ()
    only_shas: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.positives:
            raise ValueError("a query needs at least one positive vector")

    @property
    def nearest(self) -> bool:
        return len(self.positives) == 1 and not self.negatives

    def threshold(self, min_score: float | None) -> float | None:
        """``min_score`` in the engine's units (it applies the threshold before our division)."""
        return None if min_score is None else min_score * len(self.positives)

    def scaled(self, engine_score: float) -> float:
        return engine_score / len(self.positives)


@dataclass(frozen=True)
class Scored:
    """A point of a candidate list: its id, score and content, without the rest of its payload."""

    id: str
    score: float
    sha256: str


class VectorStore(ABC):
    """Segments + image records. Implementations: ``EdgeStore`` (embedded), ``ServerStore`` (Qdrant)."""

    @abstractmethod
    def ensure(self, dim: int) -> None:
        """Create the collections for ``dim``-d cosine vectors if missing; ``StoreError`` if an existing
        segments collection has another dimension (the model changed: use another collection)."""

    @property
    @abstractmethod
    def dim(self) -> int | None:
        """Vector size of the segments collection, or None if it does not exist yet."""

    @abstractmethod
    def upsert_segments(self, points: Sequence[SegmentPoint]) -> None: ...

    @abstractmethod
    def put_image(self, entry: ImageEntry) -> None: ...

    def put_images(self, entries: Sequence[ImageEntry]) -> None:
        """Several records in one write (one commit's worth)."""
        for entry in entries:
            self.put_image(entry)

    @abstractmethod
    def get_image(self, path: str) -> ImageEntry | None: ...

    @abstractmethod
    def get_image_by_id(self, image_id: str) -> ImageEntry | None:
        """The image record whose id is ``image_id`` (``image_id(path)``): one lookup, no scan."""

    @abstractmethod
    def iter_images(self) -> Iterator[ImageEntry]: ...

    @abstractmethod
    def find_images(self, sha256: str) -> list[ImageEntry]:
        """Image records with this content hash (a file indexed under another path)."""

    @abstractmethod
    def delete_records(self, paths: Sequence[str]) -> None:
        """Delete the image records of ``paths`` (their contents' points are left as they are)."""

    @abstractmethod
    def set_content_paths(self, updates: Mapping[str, Sequence[str]]) -> dict[str, int]:
        """Make every point of each content (sha256 → paths) list exactly those paths (and their
        folders), in one write; returns each content's number of points."""

    @abstractmethod
    def delete_contents(self, shas: Sequence[str]) -> int:
        """Delete every point of these contents, in one write; returns how many went."""

    @abstractmethod
    def segment_values(self, field: str, flt: SearchFilter | None = None) -> Iterator[str]:
        """The distinct values of one payload field (the elements of an array field) over the segments
        matching ``flt``, reading that field only."""

    # References: built on the primitives above; each call is one write per collection ---------------
    def content_paths(self, sha256: str) -> list[str] | None:
        """The paths the points of ``sha256`` list; None when the content has no points."""
        found = self.get_segments([point_id(sha256, 0)])
        return list(found[0].paths) if found else None

    def add_references(self, pairs: Sequence[tuple[str, str]]) -> dict[str, int]:
        """List each path among the references of its content ((path, sha256) pairs); returns each
        content's number of points (contents without points are left out)."""
        wanted: dict[str, list[str]] = {}
        for path, sha in pairs:
            wanted.setdefault(sha, []).append(path)
        updates = {}
        for sha, paths in wanted.items():
            current = self.content_paths(sha)
            if current is not None:
                updates[sha] = [*current, *paths]  # every point, even if some list it already
        return self.set_content_paths(updates) if updates else {}

    def add_reference(self, path: str, sha256: str) -> int:
        return self.add_references([(path, sha256)]).get(sha256, 0)

    def delete_images(self, paths: Sequence[str], keep: Collection[str] = ()) -> int:
        """Delete the records of ``paths`` and their references; a content's points go once no path
        refers to it (``keep``: contents to keep even so). Returns how many segment points went."""
        if not paths:
            return 0
        self.delete_records(paths)
        return self._unreference(self._listing(paths), keep)

    def delete_image(self, path: str, keep: Collection[str] = ()) -> int:
        return self.delete_images([path], keep)

    def clear_references(self, paths: Mapping[str, str | None], keep: Collection[str] = ()) -> int:
        """Drop each path (path → the content it keeps, or None) from every other content that lists it:
        what an interrupted run left. Returns the points deleted."""
        return self._unreference(self._listing(list(paths), paths), keep)

    def remove_reference(self, path: str, sha256: str, keep: Collection[str] = ()) -> int:
        """Drop ``path`` from the references of ``sha256``; returns how many points went."""
        return self._unreference({sha256: {path}}, keep)

    def _listing(self, paths: Sequence[str], but: Mapping[str, str | None] | None = None) -> dict[str, set[str]]:
        """content → the given paths its points list (one indexed count per path, a scroll when listed)."""
        out: dict[str, set[str]] = {}
        for p in paths:
            if self.count_segments(SearchFilter(path=p)):
                for sha in self.segment_values("sha256", SearchFilter(path=p)):
                    if but is None or sha != but.get(p):
                        out.setdefault(sha, set()).add(p)
        return out

    def _unreference(self, removals: Mapping[str, set[str]], keep: Collection[str]) -> int:
        """Drop paths from contents (content → paths); a content left without a path goes, unless kept."""
        updates, gone = {}, []
        for sha, drop in removals.items():
            current = self.content_paths(sha)
            if current is None:
                continue
            rest = [p for p in current if p not in drop]
            if rest or sha in keep:
                if rest != current:
                    updates[sha] = rest
            else:
                gone.append(sha)
        if updates:
            self.set_content_paths(updates)
        return self.delete_contents(gone) if gone else 0

    def count_contents(self) -> int:
        """Distinct contents among the image records (``count_images`` counts paths)."""
        return len({e.sha256 for e in self.iter_images()})

    # Migration from one path per point (stores written before content addressing) -----------------
    @abstractmethod
    def _segment_indexes(self) -> set[str]:
        """The payload fields of the segments collection that have an index."""

    @abstractmethod
    def _drop_legacy_path(self) -> None:
        """Delete the legacy ``path`` payload field and its index from every segment point."""

    def needs_migration(self) -> bool:
        return self.dim is not None and LEGACY_PATH_FIELD in self._segment_indexes()

    def migrate(self) -> int:
        """Move a store written with one ``path`` per point to ``paths`` per content: each content lists
        the paths of its image records (points of a content no record names keep their own path, for
        ``prune`` to judge). Returns the contents migrated; 0 when there was nothing to do."""
        if not self.needs_migration():
            return 0
        self.ensure(self.dim)  # type: ignore[arg-type]  # the new indexes
        recorded: dict[str, set[str]] = {}
        for e in self.iter_images():
            recorded.setdefault(e.sha256, set()).add(e.path)
        legacy: dict[str, set[str]] = {}
        for h in self.scroll_segments():
            legacy.setdefault(h.sha256, set()).update(h.paths)
        self.set_content_paths({sha: sorted(recorded.get(sha) or paths) for sha, paths in legacy.items()})
        self._drop_legacy_path()
        return len(legacy)

    @abstractmethod
    def search(
        self, vector: np.ndarray, k: int, flt: SearchFilter | None = None, min_score: float | None = None,
        masks: bool = True,
    ) -> list[Hit]:
        """The ``k`` nearest segments; ``masks=False``: their ``rle`` is left out (None)."""

    def with_masks(self, hits: Sequence[Hit]) -> list[Hit]:
        """``hits`` with their masks: those searched without are read by id (one call)."""
        missing = [h.id for h in hits if h.rle is None]
        if not missing:
            return list(hits)
        rles = {h.id: h.rle for h in self.get_segments(missing)}
        return [h if h.rle is not None else replace(h, rle=rles.get(h.id), payload={**h.payload, "rle": rles.get(h.id)})
                for h in hits]

    # Query forms (``use_search.query.forms``): each one engine call ----------------------------------
    @abstractmethod
    def query(self, q: VectorQuery, k: int, min_score: float | None = None) -> list[Hit]:
        """The ``k`` best segments for ``q`` (score as ``VectorQuery`` says), best first."""

    @abstractmethod
    def query_batch(self, qs: Sequence[VectorQuery], k: int, min_score: float | None = None) -> list[list[Scored]]:
        """The ``k`` best points of each query, in one engine call, reading only their ``sha256``."""

    @abstractmethod
    def query_groups(self, q: VectorQuery, k: int, per_group: int, min_score: float | None = None) -> list[list[Hit]]:
        """The ``k`` best contents (images) for ``q``, ranked by their best segment, each with its
        ``per_group`` best segments."""

    @abstractmethod
    def get_segments(self, ids: Sequence[str]) -> list[Hit]:
        """Segments by id (score 0.0), in the order given; unknown ids are left out."""

    @abstractmethod
    def scroll_segments(self, flt: SearchFilter | None = None) -> Iterator[Hit]:
        """Every segment matching ``flt`` (score 0.0), in no particular order."""

    @abstractmethod
    def count_segments(self, flt: SearchFilter | None = None) -> int: ...

    def segment_paths(self, flt: SearchFilter | None = None) -> Iterator[str]:
        """The distinct paths the segments matching ``flt`` refer to (reads the paths field only)."""
        return self.segment_values("paths", flt)

    @abstractmethod
    def count_images(self) -> int: ...

    # Integrity (``store check``): raw points, read without trusting their payload ---------------------
    @abstractmethod
    def point_ids(self) -> Iterator[str]:
        """Every segment point's id (reads neither payload nor vector, so damage there does not stop it)."""

    @abstractmethod
    def read_points(self, ids: Sequence[str]) -> list[StoredPoint]:
        """The points with these ids, vector and payload as stored (unknown ids left out);
        ``StoreDamagedError`` if the engine cannot read one of them."""

    @abstractmethod
    def delete_segments(self, ids: Sequence[str]) -> None:
        """Delete segment points by id (whatever their payload holds)."""

    def snapshot(self, out: Path) -> None:
        """Write a backup of both collections to the file ``out`` (``restore`` reads it back)."""
        raise StoreError(
            f"snapshots are not supported on this backend ({type(self).__name__}): use the Qdrant server's own "
            "snapshot API (POST /collections/NAME/snapshots) for both collections"
        )

    def optimize(self) -> None:
        """Index what is not indexed yet (HNSW for the embedded store). No-op where the engine does it."""

    def index_info(self) -> dict[str, int]:
        """Segments collection: engine segments, points, points in an HNSW index (the rest are scanned)."""
        n = self.count_segments()
        return {"segments": 0, "points": n, "indexed": n}

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "VectorStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hit_from(id: Any, score: float, payload: dict[str, Any], flt: SearchFilter | None = None) -> Hit:
    """A hit whose ``path`` is one the filter asked for (the first listed path without a filter)."""
    paths = payload.get("paths")
    if paths is None:  # a point written before content addressing, not migrated yet
        paths = [payload[LEGACY_PATH_FIELD]]
    chosen = paths[0] if paths else ""
    if flt is not None and (flt.path is not None or flt.under is not None):
        under = None if flt.under is None else str(PurePosixPath(flt.under))
        chosen = next(
            (p for p in paths if p == flt.path or (under is not None and under in ancestor_dirs(p))), chosen
        )
    return Hit.from_payload(str(id), score, payload, path=chosen, paths=list(paths))


def segment_payload(
    *,
    paths: Sequence[str],
    sha256: str,
    width: int,
    height: int,
    segment_index: int,
    n_segments: int,
    rle: dict[str, Any],
    bbox: tuple[int, int, int, int],
    area: int,
    predicted_iou: float,
    stability_score: float,
    source: str,
    model: str,
    indexed_at: str,
) -> dict[str, Any]:
    return {
        **references(paths),
        "sha256": sha256,
        "width": width,
        "height": height,
        "segment_index": segment_index,
        "n_segments": n_segments,
        "rle": rle,
        "bbox": list(bbox),
        "area": area,
        "predicted_iou": predicted_iou,
        "stability_score": stability_score,
        "source": source,
        "model": model,
        "indexed_at": indexed_at,
    }
