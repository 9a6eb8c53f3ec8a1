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
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import qdrant_edge as qe

from use_search.store.base import (
    INDEXED_FIELDS,
    ImageEntry,
    SearchFilter,
    StoreError,
    VectorStore,
    image_id,
)
from use_search.types import Hit, SegmentPoint

LOCK_FILE = ".lock"
SEGMENTS_DIR = "segments"
IMAGES_DIR = "images"
EDGE_CONFIG_FILE = "edge_config.json"  # written by qdrant-edge into every shard folder
UPSERT_BATCH = 512  # points per WAL record
SCROLL_PAGE = 256
IMAGE_VECTOR = [1.0]


class EdgeStore(VectorStore):
    def __init__(self, path: Path, collection: str) -> None:
        self.root = Path(path) / collection
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock(self.root / LOCK_FILE, self.root)
        self._segments: qe.EdgeShard | None = None
        self._images: qe.EdgeShard | None = None
        self._dim: int | None = None
        try:
            if _shard_exists(self.root / SEGMENTS_DIR):
                self._dim = _persisted_dim(self.root / SEGMENTS_DIR)
                self._segments = _load(self.root / SEGMENTS_DIR)
            if _shard_exists(self.root / IMAGES_DIR):
                self._images = _load(self.root / IMAGES_DIR)
        except BaseException:
            self.close()
            raise

    # Collections ---------------------------------------------------------------------------------
    def ensure(self, dim: int) -> None:
        if self._segments is not None:
            if self._dim != dim:
                raise StoreError(
                    f"store at {self.root} holds {self._dim}-d vectors, the model gives {dim}-d: "
                    "use another collection (store.collection) for this model"
                )
        else:
            config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine))
            self._segments = _create(self.root / SEGMENTS_DIR, config)
            self._dim = dim
        if self._images is None:
            config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=1, distance=qe.Distance.Dot))
            self._images = _create(self.root / IMAGES_DIR, config)
        for shard in (self._segments, self._images):
            existing = shard.info().payload_schema
            for name in INDEXED_FIELDS:
                if name not in existing:
                    shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))
            shard.flush()

    @property
    def dim(self) -> int | None:
        return self._dim

    # Writes --------------------------------------------------------------------------------------
    def upsert_segments(self, points: Sequence[SegmentPoint]) -> None:
        shard = self._require(self._segments)
        for start in range(0, len(points), UPSERT_BATCH):
            batch = [
                qe.Point(p.id, _vector(p.vector), p.payload) for p in points[start : start + UPSERT_BATCH]
            ]
            shard.update(qe.UpdateOperation.upsert_points(batch))
        shard.flush()

    def put_image(self, entry: ImageEntry) -> None:
        shard = self._require(self._images)
        point = qe.Point(image_id(entry.path), IMAGE_VECTOR, entry.payload())
        shard.update(qe.UpdateOperation.upsert_points([point]))
        shard.flush()

    def delete_image(self, path: str) -> int:
        if self._segments is None or self._images is None:
            return 0
        # Record first: if we die in between, the leftover segments read as an unfinished image.
        self._images.update(qe.UpdateOperation.delete_points([image_id(path)]))
        self._images.flush()
        flt = _filter(SearchFilter(path=path))
        n = self._segments.count(qe.CountRequest(exact=True, filter=flt))
        if n:
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
        return [Hit.from_payload(str(p.id), p.score, p.payload) for p in self._segments.query(request)]

    def get_segments(self, ids: Sequence[str]) -> list[Hit]:
        if self._segments is None or not ids:
            return []
        found = {str(r.id): r.payload for r in self._segments.retrieve(list(ids), True, False)}
        return [Hit.from_payload(i, 0.0, found[i]) for i in ids if i in found]

    def scroll_segments(self, flt: SearchFilter | None = None) -> Iterator[Hit]:
        for record in _scroll(self._segments, flt):
            yield Hit.from_payload(str(record.id), 0.0, record.payload)

    def count_segments(self, flt: SearchFilter | None = None) -> int:
        if self._segments is None:
            return 0
        return self._segments.count(qe.CountRequest(exact=True, filter=_filter(flt)))

    # Lifecycle -----------------------------------------------------------------------------------
    def optimize(self) -> None:
        for shard in (self._segments, self._images):
            if shard is not None:
                shard.optimize()
                shard.flush()

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


def _load(path: Path) -> qe.EdgeShard:
    try:
        return qe.EdgeShard.load(str(path))
    except Exception as e:  # qdrant-edge raises bare Exception
        raise StoreError(f"cannot open the embedded store shard at {path}: {e}") from None


def _create(path: Path, config: qe.EdgeConfig) -> qe.EdgeShard:
    try:
        return qe.EdgeShard.create(str(path), config)
    except Exception as e:
        raise StoreError(f"cannot create the embedded store shard at {path}: {e}") from None


def _vector(vector: np.ndarray) -> list[float]:
    return np.asarray(vector, dtype=np.float32).ravel().tolist()


def _filter(flt: SearchFilter | None) -> qe.Filter | None:
    if flt is None or flt.is_empty():
        return None
    return qe.Filter(must=[qe.FieldCondition(key=k, match=qe.MatchValue(v)) for k, v in flt.conditions()])


def _scroll(shard: qe.EdgeShard | None, flt: SearchFilter | None) -> Iterator[Any]:
    if shard is None:
        return
    offset = None
    while True:
        records, offset = shard.scroll(
            qe.ScrollRequest(offset=offset, limit=SCROLL_PAGE, filter=_filter(flt), with_payload=True)
        )
        yield from records
        if offset is None:
            return
