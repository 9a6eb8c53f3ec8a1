"""``EdgeStore``: the embedded store, on qdrant-edge (the Qdrant engine in-process).

Layout under ``path/collection/``::

    .lock      exclusive ``flock`` of the owning process, holds its pid
    segments/  edge shard: one point per segment, cosine vectors of the model's dimension
    images/    edge shard: one record per image; edge needs a vector, so a constant 1-d one

Durability: ``EdgeShard.update`` appends the operation to the shard's WAL before applying it, and the
WAL is a memory-mapped file, so once ``update`` returns the operation survives a SIGKILL of this
process (the page cache still holds it; the next load replays the WAL). It does not survive an OS
crash or power loss until the WAL and segments are fsynced: that is ``EdgeShard.flush()``, which we
call after every write, so an acknowledged write is on disk.

Disk space: qdrant-edge writes through memory-mapped files, so a full disk is not an ``OSError`` but a
SIGBUS that kills the process mid-write. Every write (and creating the store) first checks the free
space of the store's file system and raises ``StoreFullError`` while there is still a margin
(``min_free_bytes``): the process stops cleanly and what was committed stays.

Index builds: segments are capped (``max_segment_mb``), so ``optimize()`` builds an HNSW graph over the
points added since the last build (merged with the smallest indexed segment when both fit under the
cap), never over the whole collection again; new points below the engine's indexing threshold stay in
a plain segment that searches scan exactly.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import qdrant_edge as qe

from use_search.store.base import (
    IMAGE_INDEXED_FIELDS,
    LEGACY_PATH_FIELD,
    SEGMENT_INDEXED_FIELDS,
    ImageEntry,
    SearchFilter,
    StoreError,
    StoreFullError,
    VectorStore,
    hit_from,
    image_id,
    references,
)
from use_search.types import Hit, SegmentPoint

LOCK_FILE = ".lock"
SEGMENTS_DIR = "segments"
IMAGES_DIR = "images"
EDGE_CONFIG_FILE = "edge_config.json"  # written by qdrant-edge into every shard folder
UPSERT_BATCH = 512  # points per WAL record
SCROLL_PAGE = 256
IMAGE_VECTOR = [1.0]
MB = 1024 * 1024
# What creating a store fills on disk before its first point (two shards: WAL pages, segment files),
# measured on tmpfs; its sparse files span ~240 MB but are filled lazily. Loading a store later fills
# its payload-index and vector files (~100 MB for a new store on tmpfs): checked when it is opened.
NEW_STORE_BYTES = 15 * MB
FILLED_ON_LOAD = ("payload_index", "vector_storage")
RECORD_BYTES = 4096  # an image record, its WAL entry and index entries
SEGMENT_OVERHEAD_BYTES = 1024  # per segment point beyond its vector and mask: payload fields, ids, indexes
WRITE_AMPLIFICATION = 3  # a point lands in the WAL, the segment's storage and the payload indexes
DELETE_BYTES = 64 * 1024


def free_bytes(path: Path) -> int:
    """Free space (for unprivileged writers) of the file system holding ``path`` or its nearest parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


class EdgeStore(VectorStore):
    def __init__(
        self,
        path: Path,
        collection: str,
        *,
        min_free_bytes: int = 256 * MB,
        max_segment_mb: int | None = 128,
        indexing_threshold_kb: int | None = None,
        free_space: Callable[[Path], int] = free_bytes,
    ) -> None:
        self.root = Path(path) / collection
        self.min_free_bytes = min_free_bytes
        self.free_space = free_space
        self._optimizers = qe.EdgeOptimizersConfig(
            max_segment_size=max_segment_mb * 1024 if max_segment_mb else None,
            indexing_threshold=indexing_threshold_kb,
        )
        if not _shard_exists(self.root / SEGMENTS_DIR):
            self._check_space(NEW_STORE_BYTES, "a new store")
        else:  # loading fills sparse index and vector files: that much must fit, margin or not
            need = _unfilled_bytes(self.root, FILLED_ON_LOAD)
            if need and self.free_space(self.root) < need:
                raise StoreFullError(
                    f"not enough free disk space to open the store at {self.root}: loading it fills "
                    f"{_mb(need)} of index and vector files and {_mb(self.free_space(self.root))} are free. "
                    "Free some space."
                )
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock(self.root / LOCK_FILE, self.root)
        self._segments: qe.EdgeShard | None = None
        self._images: qe.EdgeShard | None = None
        self._dim: int | None = None
        try:
            if _shard_exists(self.root / SEGMENTS_DIR):
                self._dim = _persisted_dim(self.root / SEGMENTS_DIR)
                self._segments = _load(self.root / SEGMENTS_DIR, self._config(self._dim, qe.Distance.Cosine))
            if _shard_exists(self.root / IMAGES_DIR):
                self._images = _load(self.root / IMAGES_DIR, self._config(1, qe.Distance.Dot))
        except BaseException:
            self.close()
            raise

    def _config(self, dim: int, distance: Any) -> qe.EdgeConfig:
        return qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=distance), optimizers=self._optimizers)

    def _check_space(self, need: int, what: str) -> None:
        free = self.free_space(self.root)
        if free < need + self.min_free_bytes:
            raise StoreFullError(
                f"not enough free disk space for the store at {self.root}: {_mb(free)} free, {what} needs "
                f"about {_mb(need)} plus the {_mb(self.min_free_bytes)} safety margin (setting store.min_free_mb). "
                "Free some space or move the store (--store DIR), then rerun: everything written so far is kept."
            )

    # Collections ---------------------------------------------------------------------------------
    def ensure(self, dim: int) -> None:
        if self._segments is not None:
            if self._dim != dim:
                raise StoreError(
                    f"store at {self.root} holds {self._dim}-d vectors, the model gives {dim}-d: "
                    "use another collection (store.collection) for this model"
                )
        else:
            self._check_space(NEW_STORE_BYTES, "a new store")
            self._segments = _create(self.root / SEGMENTS_DIR, self._config(dim, qe.Distance.Cosine))
            self._dim = dim
        if self._images is None:
            self._images = _create(self.root / IMAGES_DIR, self._config(1, qe.Distance.Dot))
        for shard, fields in ((self._segments, SEGMENT_INDEXED_FIELDS), (self._images, IMAGE_INDEXED_FIELDS)):
            existing = shard.info().payload_schema
            missing = [name for name in fields if name not in existing]
            if missing:
                self._check_space(DELETE_BYTES, "a payload index")
            for name in missing:
                shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))
            shard.flush()

    @property
    def dim(self) -> int | None:
        return self._dim

    # Writes --------------------------------------------------------------------------------------
    def upsert_segments(self, points: Sequence[SegmentPoint]) -> None:
        shard = self._require(self._segments)
        need = sum(
            np.asarray(p.vector).size * 4 + len(str(p.payload.get("rle", ""))) + SEGMENT_OVERHEAD_BYTES for p in points
        )
        self._check_space(WRITE_AMPLIFICATION * need, f"writing {len(points)} segments")
        for start in range(0, len(points), UPSERT_BATCH):
            batch = [
                qe.Point(p.id, _vector(p.vector), p.payload) for p in points[start : start + UPSERT_BATCH]
            ]
            shard.update(qe.UpdateOperation.upsert_points(batch))
        shard.flush()

    def put_image(self, entry: ImageEntry) -> None:
        self.put_images([entry])

    def put_images(self, entries: Sequence[ImageEntry]) -> None:
        shard = self._require(self._images)
        if not entries:
            return
        self._check_space(len(entries) * RECORD_BYTES, f"writing {len(entries)} image records")
        points = [qe.Point(image_id(e.path), IMAGE_VECTOR, e.payload()) for e in entries]
        shard.update(qe.UpdateOperation.upsert_points(points))
        shard.flush()

    def delete_records(self, paths: Sequence[str]) -> None:
        if self._images is None or not paths:
            return
        self._check_space(DELETE_BYTES, "a delete")
        self._images.update(qe.UpdateOperation.delete_points([image_id(p) for p in paths]))
        self._images.flush()

    def set_content_paths(self, updates: Mapping[str, Sequence[str]]) -> dict[str, int]:
        if self._segments is None:
            return {}
        counts = {}
        for sha, paths in updates.items():
            flt = _filter(SearchFilter(sha256=sha))
            counts[sha] = n = self._segments.count(qe.CountRequest(exact=True, filter=flt))
            if n:
                fields = references(paths)
                self._check_space(WRITE_AMPLIFICATION * n * (len(str(fields)) + SEGMENT_OVERHEAD_BYTES), "updating references")
                self._segments.update(qe.UpdateOperation.set_payload_by_filter(flt, fields))
        self._segments.flush()
        return counts

    def delete_contents(self, shas: Sequence[str]) -> int:
        if self._segments is None or not shas:
            return 0
        flt = qe.Filter(must=[qe.FieldCondition(key="sha256", match=qe.MatchAny(list(shas)))])
        n = self._segments.count(qe.CountRequest(exact=True, filter=flt))
        if n:
            self._check_space(DELETE_BYTES, "a delete")
            self._segments.update(qe.UpdateOperation.delete_points_by_filter(flt))
            self._segments.flush()
        return n

    # Images --------------------------------------------------------------------------------------
    def get_image(self, path: str) -> ImageEntry | None:
        return self.get_image_by_id(image_id(path))

    def get_image_by_id(self, image_id: str) -> ImageEntry | None:
        if self._images is None:
            return None
        records = self._images.retrieve([image_id], True, False)
        return ImageEntry.from_payload(records[0].payload) if records else None

    def iter_images(self) -> Iterator[ImageEntry]:
        for record in _scroll(self._images, None):
            yield ImageEntry.from_payload(record.payload)

    def find_images(self, sha256: str) -> list[ImageEntry]:
        records = _scroll(self._images, SearchFilter(sha256=sha256))
        return [ImageEntry.from_payload(r.payload) for r in records]

    def count_images(self) -> int:
        if self._images is None:
            return 0
        return self._images.count(qe.CountRequest(exact=True))

    # Segments ------------------------------------------------------------------------------------
    def search(
        self, vector: np.ndarray, k: int, flt: SearchFilter | None = None, min_score: float | None = None
    ) -> list[Hit]:
        if self._segments is None or k <= 0:
            return []
        request = qe.QueryRequest(
            limit=k,
            query=qe.Query.Nearest(_vector(vector)),
            filter=_filter(flt),
            score_threshold=min_score,
            with_payload=True,
        )
        return [hit_from(p.id, p.score, p.payload, flt) for p in self._segments.query(request)]

    def get_segments(self, ids: Sequence[str]) -> list[Hit]:
        if self._segments is None or not ids:
            return []
        found = {str(r.id): r.payload for r in self._segments.retrieve(list(ids), True, False)}
        return [hit_from(i, 0.0, found[i]) for i in ids if i in found]

    def scroll_segments(self, flt: SearchFilter | None = None) -> Iterator[Hit]:
        for record in _scroll(self._segments, flt):
            yield hit_from(record.id, 0.0, record.payload, flt)

    def count_segments(self, flt: SearchFilter | None = None) -> int:
        if self._segments is None:
            return 0
        return self._segments.count(qe.CountRequest(exact=True, filter=_filter(flt)))

    def segment_values(self, field: str, flt: SearchFilter | None = None) -> Iterator[str]:
        seen: set[str] = set()
        for record in _scroll(self._segments, flt, with_payload=[field]):
            value = record.payload.get(field)
            for v in value if isinstance(value, list) else [] if value is None else [value]:
                if v not in seen:
                    seen.add(v)
                    yield v

    def _segment_indexes(self) -> set[str]:
        return set(self._segments.info().payload_schema) if self._segments is not None else set()

    def _drop_legacy_path(self) -> None:
        shard = self._require(self._segments)
        self._check_space(DELETE_BYTES, "a migration")
        shard.update(qe.UpdateOperation.delete_payload_by_filter(qe.Filter(must=[]), [LEGACY_PATH_FIELD]))
        shard.update(qe.UpdateOperation.delete_field_index(LEGACY_PATH_FIELD))
        shard.flush()

    # Lifecycle -----------------------------------------------------------------------------------
    def optimize(self) -> None:
        for shard in (self._segments, self._images):
            if shard is None:
                continue
            info = shard.info()
            pending = info.points_count - info.indexed_vectors_count
            if shard is self._segments and pending > 0:
                # A build writes a new copy of the segments it rebuilds before dropping the old ones.
                self._check_space(2 * pending * (4 * (self._dim or 1) + 1024), "building the search index")
            shard.optimize()
            shard.flush()

    def index_info(self) -> dict[str, int]:
        """Segments collection: engine segments, points, points in an HNSW index (the rest are scanned)."""
        if self._segments is None:
            return {"segments": 0, "points": 0, "indexed": 0}
        info = self._segments.info()
        return {"segments": info.segments_count, "points": info.points_count, "indexed": info.indexed_vectors_count}

    def close(self) -> None:
        try:
            for shard in (self._segments, self._images):
                if shard is not None:
                    shard.flush()
                    shard.close()
        finally:
            self._segments = self._images = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _require(self, shard: qe.EdgeShard | None) -> qe.EdgeShard:
        if shard is None:
            raise StoreError(f"store at {self.root} has no collections yet: call ensure(dim) first")
        return shard


def _lock(lock_path: Path, root: Path) -> int:
    """Take the store's exclusive lock without waiting; ``StoreError`` naming the holder if taken.

    qdrant-edge does lock each shard's WAL folder (a second load fails with an opaque "Can't init WAL:
    WouldBlock"), but only per shard and only once the shard exists; this one lock covers the whole
    store from the moment it is opened and records who holds it.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(
            f"store at {root} is in use by another process (pid {holder}) — stop it, "
            "or use the server / the API"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _shard_exists(path: Path) -> bool:
    return (path / EDGE_CONFIG_FILE).is_file()


def _persisted_dim(path: Path) -> int:
    # EdgeShard has no config getter in Python; the shard persists its config as JSON.
    try:
        return int(json.loads((path / EDGE_CONFIG_FILE).read_text())["vectors"][""]["size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"cannot read the vector size of the shard at {path}: {e}") from None


def _unfilled_bytes(root: Path, folders: Sequence[str]) -> int:
    """Bytes not yet allocated in the sparse files below ``root`` inside folders named ``folders``."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        if any(f in Path(dirpath).parts for f in folders):
            for name in filenames:
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:
                    continue
                total += max(0, st.st_size - st.st_blocks * 512)
    return total


def _mb(n: int) -> str:
    return f"{n / MB:,.1f} MB"


def _load(path: Path, config: qe.EdgeConfig) -> qe.EdgeShard:
    # Passing the config applies our optimizer settings to stores created before them.
    try:
        return qe.EdgeShard.load(str(path), config)
    except Exception as e:  # qdrant-edge raises bare Exception
        raise StoreError(f"cannot open the embedded store shard at {path}: {e}") from None


def _create(path: Path, config: qe.EdgeConfig) -> qe.EdgeShard:
    try:
        return qe.EdgeShard.create(str(path), config)
    except Exception as e:
        raise StoreError(f"cannot create the embedded store shard at {path}: {e}") from None


def _vector(vector: np.ndarray) -> list[float]:
    return np.asarray(vector, dtype=np.float32).ravel().tolist()


def _filter(flt: SearchFilter | None, path_field: str = "paths") -> qe.Filter | None:
    if flt is None or flt.is_empty():
        return None
    return qe.Filter(must=[qe.FieldCondition(key=k, match=qe.MatchValue(v)) for k, v in flt.conditions(path_field)])


def _scroll(
    shard: qe.EdgeShard | None, flt: SearchFilter | None, with_payload: Any = True, path_field: str = "paths"
) -> Iterator[Any]:
    if shard is None:
        return
    offset = None
    while True:
        records, offset = shard.scroll(
            qe.ScrollRequest(offset=offset, limit=SCROLL_PAGE, filter=_filter(flt, path_field), with_payload=with_payload)
        )
        yield from records
        if offset is None:
            return
