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
cap), never over the whole collection again; a write that adds a cap's worth of vectors builds on the
way (store/build.py: the engine alone would put them all in one segment); new points below the
engine's indexing threshold stay in a plain segment that searches scan exactly. Quantization and what
lives on disk: store/layout.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import qdrant_edge as qe

from use_search.store.base import (
    IMAGE_INDEXED_FIELDS,
    LEGACY_PATH_FIELD,
    MASK_FIELDS,
    SEGMENT_INDEXED_FIELDS,
    ImageEntry,
    SearchFilter,
    StoreError,
    StoredPoint,
    StoreFullError,
    Scored,
    VectorQuery,
    VectorStore,
    hit_from,
    image_id,
    references,
)
from use_search.store import edge_query
from use_search.store.edge_files import (
    FILLED_ON_LOAD,
    IMAGES_DIR,
    LOCK_FILE,
    MB,
    SEGMENTS_DIR,
    SNAPSHOT_FORMAT,
    SNAPSHOT_MANIFEST,
    can_write,
    free_bytes,
    load_fill,
    mb,
    new_store_bytes,
    persisted_dim,
    private_copy,
    shard_exists,
    sparse_files,
    take_lock,
)
from use_search.store.edge_shard import Shard, as_vector, create_shard, edge_filter, load_shard, scroll
from use_search.store import layout as lay
from use_search.store.build import points_per_segment
from use_search.store.layout import Layout, SearchTuning
from use_search.types import Hit, SegmentPoint

UPSERT_BATCH = 512  # points per WAL record
IMAGE_VECTOR = [1.0]
RECORD_BYTES = 4096  # an image record, its WAL entry and index entries
SEGMENT_OVERHEAD_BYTES = 1024  # per segment point beyond its vector and mask: payload fields, ids, indexes
WRITE_AMPLIFICATION = 3  # a point lands in the WAL, the segment's storage and the payload indexes
DELETE_BYTES = 64 * 1024


class EdgeStore(VectorStore):
    """``writable=False``: a reader (query, stats, check). It asks for no free space; on a folder this
    process cannot write (a read-only mount, no permission) it searches a private copy of the store,
    taken under a shared lock, because the engine opens its files for writing."""

    def __init__(
        self,
        path: Path,
        collection: str,
        *,
        writable: bool = True,
        min_free_bytes: int = 16 * MB,
        max_segment_mb: int | None = 128,
        indexing_threshold_kb: int | None = None,
        free_space: Callable[[Path], int] = free_bytes,
        layout: Mapping[str, Any] | None = None,
        tuning: SearchTuning | None = None,
    ) -> None:
        """``layout``: the creation-time settings asked for (store/layout.py; unset ones: the store's own)."""
        self.root = Path(path) / collection
        self.writable = writable
        self.min_free_bytes = min_free_bytes
        self.free_space = free_space
        self._optimizers = qe.EdgeOptimizersConfig(
            max_segment_size=max_segment_mb * 1024 if max_segment_mb else None,
            indexing_threshold=indexing_threshold_kb,
        )
        self._max_segment_mb = max_segment_mb
        self._wanted = dict(layout or {})
        self._tuning = tuning or SearchTuning()
        self._layout: Layout | None = None
        self._written_since_build = 0  # points upserted since the last index build (an upper bound)
        self._segments: Shard | None = None
        self._images: Shard | None = None
        self._dim: int | None = None
        self._lock_fd: int | None = None
        self._private: Path | None = None  # a read-only store's copy, removed on close
        exists = shard_exists(self.root / SEGMENTS_DIR)
        if writable:
            self._check_space(load_fill(self.root) if exists else new_store_bytes(self.root), "opening it" if exists else "a new store")
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = take_lock(self.root / LOCK_FILE, self.root)
        elif exists and not can_write(self.root):
            self._private = private_copy(self.root)
        else:
            fill = load_fill(self.root)
            if fill > self.free_space(self.root):  # the engine would die of SIGBUS half-way
                raise StoreFullError(
                    f"not enough free disk space to open the store at {self.root}: loading it fills {mb(fill)} "
                    f"of index and vector files that its last writer could not fill, and {mb(self.free_space(self.root))} "
                    "are free. Free some space."
                )
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = take_lock(self.root / LOCK_FILE, self.root)
        try:
            self._open_shards()
        except BaseException:
            self.close()
            raise

    @property
    def _data(self) -> Path:
        return self._private or self.root

    def _open_shards(self) -> None:
        if shard_exists(self._data / SEGMENTS_DIR):
            self._dim = persisted_dim(self._data / SEGMENTS_DIR)
            self._layout = lay.resolve(lay.read_recorded(self._data) or lay.LEGACY, self._wanted, f"the store at {self.root}")
            self._segments = load_shard(self._data / SEGMENTS_DIR, self._config(self._dim, qe.Distance.Cosine, self._layout))
        if shard_exists(self._data / IMAGES_DIR):
            self._images = load_shard(self._data / IMAGES_DIR, self._config(1, qe.Distance.Dot))

    def _close_shards(self) -> None:
        try:
            for shard in (self._segments, self._images):
                if shard is not None:
                    shard.flush()
                    shard.close()
        finally:
            self._segments = self._images = None

    def _config(self, dim: int, distance: Any, layout: Layout | None = None) -> qe.EdgeConfig:
        if layout is None:  # the image records: a constant 1-d vector each
            return qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=distance), optimizers=self._optimizers)
        return qe.EdgeConfig(
            vectors=lay.edge_vectors(layout, dim), quantization_config=lay.edge_quantization(layout),
            on_disk_payload=layout.payload_on_disk, optimizers=self._optimizers,
        )

    @property
    def layout(self) -> Layout | None:
        """How the segments collection holds vectors and payloads (None before ``ensure``)."""
        return self._layout

    def _params(self) -> Any:
        """Every search's quantization tuning (rescore, oversampling); None on a float store."""
        return lay.edge_search_params(self._layout or Layout(quantization="none"), self._tuning)

    def _check_space(self, need: int, what: str) -> None:
        if not self.writable:
            raise StoreError(f"the store at {self.root} is open for reading only: {what} needs a writer")
        free = self.free_space(self.root)
        if free < need + self.min_free_bytes:
            raise StoreFullError(
                f"not enough free disk space for the store at {self.root}: {mb(free)} free, {what} needs "
                f"about {mb(need)} plus the {mb(self.min_free_bytes)} safety margin (setting store.min_free_mb). "
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
            self._check_space(new_store_bytes(self.root), "a new store")
            self._layout = lay.resolve(None, self._wanted, f"the store at {self.root}")
            lay.write_recorded(self.root, self._layout)  # before the shard: a shard is never without it
            self._segments = create_shard(self.root / SEGMENTS_DIR, self._config(dim, qe.Distance.Cosine, self._layout))
            self._dim = dim
        if self._images is None:
            self._images = create_shard(self.root / IMAGES_DIR, self._config(1, qe.Distance.Dot))
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
        cap = points_per_segment(self._dim or 1, self._max_segment_mb)
        for start in range(0, len(points), UPSERT_BATCH):
            batch = [
                qe.Point(p.id, as_vector(p.vector), p.payload) for p in points[start : start + UPSERT_BATCH]
            ]
            shard.update(qe.UpdateOperation.upsert_points(batch))
            self._written_since_build += len(batch)
            if cap is not None and self._written_since_build >= cap:
                # The engine puts every point written since the last build into one segment, whatever
                # its size cap: building now keeps each new segment (and the build's memory) at the cap.
                self._build(shard, self._pending(shard))
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
            flt = edge_filter(SearchFilter(sha256=sha))
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
        for record in scroll(self._images, None):
            yield ImageEntry.from_payload(record.payload)

    def find_images(self, sha256: str) -> list[ImageEntry]:
        records = scroll(self._images, SearchFilter(sha256=sha256))
        return [ImageEntry.from_payload(r.payload) for r in records]

    def count_images(self) -> int:
        if self._images is None:
            return 0
        return self._images.count(qe.CountRequest(exact=True))

    # Segments ------------------------------------------------------------------------------------
    def search(
        self, vector: np.ndarray, k: int, flt: SearchFilter | None = None, min_score: float | None = None,
        masks: bool = True,
    ) -> list[Hit]:
        if self._segments is None or k <= 0:
            return []
        request = qe.QueryRequest(
            limit=k,
            query=qe.Query.Nearest(as_vector(vector)),
            filter=edge_filter(flt),
            score_threshold=min_score,
            with_payload=True if masks else qe.PayloadSelector.Exclude(list(MASK_FIELDS)),
            params=self._params(),
        )
        return [hit_from(p.id, p.score, p.payload, flt) for p in self._segments.query(request)]

    def query(self, q: VectorQuery, k: int, min_score: float | None = None) -> list[Hit]:
        return edge_query.query(self._segments, q, k, min_score, self._params()) if self._segments is not None and k > 0 else []

    def query_batch(self, qs: Sequence[VectorQuery], k: int, min_score: float | None = None) -> list[list[Scored]]:
        return edge_query.query_batch(self._segments, qs, k, min_score, self._params()) if self._segments is not None else [[] for _ in qs]

    def query_groups(self, q: VectorQuery, k: int, per_group: int, min_score: float | None = None) -> list[list[Hit]]:
        return edge_query.groups(self._segments, q, k, per_group, min_score, self._params()) if self._segments is not None else []

    def get_segments(self, ids: Sequence[str]) -> list[Hit]:
        if self._segments is None or not ids:
            return []
        found = {str(r.id): r.payload for r in self._segments.retrieve(list(ids), True, False)}
        return [hit_from(i, 0.0, found[i]) for i in ids if i in found]

    def scroll_segments(self, flt: SearchFilter | None = None) -> Iterator[Hit]:
        for record in scroll(self._segments, flt):
            yield hit_from(record.id, 0.0, record.payload, flt)

    def count_segments(self, flt: SearchFilter | None = None) -> int:
        if self._segments is None:
            return 0
        return self._segments.count(qe.CountRequest(exact=True, filter=edge_filter(flt)))

    def segment_values(self, field: str, flt: SearchFilter | None = None) -> Iterator[str]:
        seen: set[str] = set()
        for record in scroll(self._segments, flt, with_payload=[field]):
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

    # Integrity -----------------------------------------------------------------------------------
    def point_ids(self) -> Iterator[str]:
        for record in scroll(self._segments, None, with_payload=False):
            yield str(record.id)

    def read_points(self, ids: Sequence[str]) -> list[StoredPoint]:
        if self._segments is None or not ids:
            return []
        return [
            StoredPoint(str(r.id), np.asarray(r.vector, dtype=np.float32), r.payload)
            for r in self._segments.retrieve(list(ids), True, True)
        ]

    def delete_segments(self, ids: Sequence[str]) -> None:
        if self._segments is None or not ids:
            return
        self._check_space(DELETE_BYTES, "a delete")
        # A delete reads the old payload (to unindex it), and one that no longer decodes would fail it and
        # leave the shard refusing writes until reopened: the payloads are overwritten first.
        self._segments.update(qe.UpdateOperation.overwrite_payload(list(ids), {}))
        self._segments.update(qe.UpdateOperation.delete_points(list(ids)))
        self._segments.flush()

    # Lifecycle -----------------------------------------------------------------------------------
    def optimize(self) -> None:
        for shard in (self._segments, self._images):
            if shard is not None:
                self._build(shard, self._pending(shard) if shard is self._segments else 0)

    def _pending(self, shard: "Shard") -> int:
        info = shard.info()
        return info.points_count - info.indexed_vectors_count

    def _build(self, shard: "Shard", pending: int) -> None:
        if pending > 0:
            # A build writes a new copy of the segments it rebuilds before dropping the old ones.
            self._check_space(2 * pending * (4 * (self._dim or 1) + 1024), "building the search index")
        shard.optimize()
        shard.flush()
        if shard is self._segments:
            self._written_since_build = 0

    def snapshot(self, out: Path) -> None:
        """A gzip tar of both shards, taken with the store locked and its shards closed (nothing moves
        while it is written): ``restore_snapshot`` unpacks it with the engine's ``unpack_snapshot``."""
        out = Path(out)
        dim, points, images = self._dim, self.count_segments(), self.count_images()
        self._close_shards()
        tmp = out.with_name(out.name + ".partial")
        try:
            with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:  # sparse engine files: mostly zeros
                manifest = json.dumps({
                    "format": SNAPSHOT_FORMAT, "collection": self.root.name, "dim": dim,
                    "points": points, "images": images, "layout": lay.read_recorded(self._data),
                }).encode()
                info = tarfile.TarInfo(SNAPSHOT_MANIFEST)
                info.size = len(manifest)
                tar.addfile(info, io.BytesIO(manifest))
                for name in (SEGMENTS_DIR, IMAGES_DIR):
                    if shard_exists(self._data / name):
                        tar.add(self._data / name, arcname=name)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
            self._open_shards()

    def index_info(self) -> dict[str, int]:
        """Segments collection: engine segments, points, points in an HNSW index (the rest are scanned)."""
        if self._segments is None:
            return {"segments": 0, "points": 0, "indexed": 0}
        info = self._segments.info()
        return {"segments": info.segments_count, "points": info.points_count, "indexed": info.indexed_vectors_count}

    def close(self) -> None:
        try:
            self._close_shards()
            if self.writable and self._lock_fd is not None:
                self._fill_for_readers()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
            if self._private is not None:
                shutil.rmtree(self._private.parent, ignore_errors=True)
                self._private = None

    def _fill_for_readers(self) -> None:
        """Allocate now what the next load would (memory-backed file systems only), while a writer's
        space check can still refuse it; if it does not fit, the next open says so instead."""
        need = load_fill(self.root)
        if not need or self.free_space(self.root) < need + self.min_free_bytes:
            return
        for file in sparse_files(self.root, FILLED_ON_LOAD):
            fd = os.open(file, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)

    def _require(self, shard: Shard | None) -> Shard:
        if shard is None:
            raise StoreError(f"store at {self.root} has no collections yet: call ensure(dim) first")
        return shard
