"""The indexer: read → segment → embed → write, committed in small batches.

Every file goes through the same steps, decided in file order:

1. **plan** (``stat`` only): not a regular file → failed; the image record has the same size and mtime
   → skipped without opening the file (``verify`` or ``force`` turn this off);
2. **read + hash**: same content as the record → skipped, and the record's size/mtime are refreshed;
3. **decide**: a copy of an image indexed before or earlier in this run → duplicate;
4. **decode**, then **segment + embed** → points;
5. **write**: the path's old segments go, then the new points, then the image record.

Consistency rule (see ``store/base.py``): an image's record is written only after all of its segment
points, so an interrupted run never leaves an image that looks done but is not; the rerun redoes it
and its deterministic point ids overwrite whatever part was written.

Two runners chain these steps. ``pipeline=False`` is the reference: one file at a time, one
``segment``/``embed_segments`` call per image, writes inline. The pipelined runner (default) reads,
hashes and decodes in a thread pool (PIL and hashlib release the GIL) in a bounded, ordered window,
segments and embeds ``image_batch`` images per ``segment_batch``/``embed_batch`` call, and hands
commits to a writer thread through a bounded queue, so decode ‖ model ‖ upsert overlap while host
memory stays bounded whatever the number of images (the file list is streamed too). Decisions are
taken in file order on the calling thread from the store and this run's own decisions only, so both
runners give the same points.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np

from use_search.imaging import fit_side, to_original
from use_search.indexer.read import (
    ImageReadError,
    LoadedImage,
    count_images,
    find_images,
    load_image,
    max_file_bytes,
    read_file,
    route_warnings,
    sha256_bytes,
    stat_file,
)
from use_search.model.base import Embedder
from use_search.store.base import ImageEntry, SearchFilter, StoreError, VectorStore, segment_payload
from use_search.types import Segment, SegmentPoint, Segmenter, point_id

Status = Literal["indexed", "skipped", "failed", "duplicate"]


@dataclass
class ImageEvent:
    path: str
    status: Status
    segments: int = 0
    reason: str = ""
    warnings: list[str] = field(default_factory=list)  # the decoder's (e.g. corrupt EXIF), whatever the status


@dataclass
class IndexReport:
    indexed: int = 0
    skipped: int = 0
    duplicates: int = 0
    segments: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (path, message): indexed all the same
    pruned_images: int = 0
    pruned_segments: int = 0
    pruned_orphans: int = 0  # paths with segments but no record and no file (left by a crash)
    hashed: int = 0  # files opened and hashed (the others were skipped on size and mtime)
    decoded: int = 0  # files decoded (new or changed content)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0

    def add(self, ev: ImageEvent) -> None:
        if ev.status == "failed":
            self.failed.append((ev.path, ev.reason))
        elif ev.status == "skipped":
            self.skipped += 1
        elif ev.status == "duplicate":
            self.duplicates += 1
        elif ev.status == "indexed":
            self.indexed += 1
            self.segments += ev.segments
        self.warnings.extend((ev.path, w) for w in ev.warnings)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def segment_points(loaded: LoadedImage, segments: Sequence[Segment], vectors: np.ndarray, model: str) -> list[SegmentPoint]:
    """The write stage's input: one point per segment with its payload. Segments found on pixels smaller
    than the record's image (the working size) are stored with their geometry at the record's size."""
    rec = loaded.record
    segments = to_original(segments, rec.height, rec.width)
    at = now_iso()
    return [
        SegmentPoint(
            id=point_id(rec.sha256, i),
            vector=vectors[i],
            payload=segment_payload(
                path=rec.path, sha256=rec.sha256, width=rec.width, height=rec.height,
                segment_index=i, n_segments=len(segments), rle=s.rle, bbox=s.bbox, area=s.area,
                predicted_iou=s.predicted_iou, stability_score=s.stability_score, source=s.source,
                model=model, indexed_at=at,
            ),
        )
        for i, s in enumerate(segments)
    ]


def index_image(segmenter: Segmenter, embedder: Embedder, loaded: LoadedImage) -> list[SegmentPoint]:
    """Segment and embed one decoded image: its points (the sequential reference; the HTTP upload)."""
    segments = segmenter.segment(loaded.pixels)
    vectors = embedder.embed_segments(loaded.pixels, segments)
    return segment_points(loaded, segments, vectors, embedder.model_id)


def segment_and_embed(segmenter: Segmenter, embedder: Embedder, images: Sequence[LoadedImage]) -> list[list[SegmentPoint] | str]:
    """Each image's points, or the reason it failed: the group through ``segment_batch`` and
    ``embed_batch``, image by image where a batched call fails, so one bad image fails alone."""
    pixels = [lo.pixels for lo in images]
    segmented: list[list[Segment] | None] = [None] * len(images)
    batch_fn = getattr(segmenter, "segment_batch", None)
    if batch_fn is not None:
        try:
            segmented = list(batch_fn(pixels))
        except Exception:  # find the culprit image by image below
            pass
    out: list[list[SegmentPoint] | str | None] = [None] * len(images)
    for i, px in enumerate(pixels):
        if segmented[i] is None:
            try:
                segmented[i] = segmenter.segment(px)
            except Exception as e:
                out[i] = f"{type(e).__name__}: {e}"
    ok = [i for i in range(len(images)) if out[i] is None]
    vectors: list[np.ndarray | None] = [None] * len(images)
    try:
        for i, v in zip(ok, embedder.embed_batch([pixels[i] for i in ok], [segmented[i] for i in ok])):
            vectors[i] = v
    except Exception:
        pass
    for i in ok:
        try:
            v = vectors[i]
            if v is None:
                v = embedder.embed_segments(pixels[i], segmented[i])
            out[i] = segment_points(images[i], segmented[i], v, embedder.model_id)  # type: ignore[arg-type]
        except Exception as e:
            out[i] = f"{type(e).__name__}: {e}"
    return out  # type: ignore[return-value]


# Work items between the steps -----------------------------------------------------------------------
@dataclass
class _Candidate:  # planned: must be read
    path: Path
    old: ImageEntry | None


@dataclass
class _Read:  # read and hashed: new or changed content
    path: Path
    old: ImageEntry | None
    data: bytes
    sha256: str
    stat: os.stat_result


@dataclass
class _Decoded:
    loaded: LoadedImage
    old: ImageEntry | None
    stat: os.stat_result


@dataclass
class Write:
    """One path's change to the store, and the event reported once it is committed."""

    event: ImageEvent
    drop: bool = False  # delete the path's old record and segments (its content changed or is gone)
    entry: ImageEntry | None = None  # the record to write, after ``points``
    points: list[SegmentPoint] = field(default_factory=list)
    fresh: bool = False  # a new index of this path: clear segments an interrupted run may have left


def commit(store: VectorStore, writes: Sequence[Write]) -> None:
    """Apply one batch with the consistency rule: old segments out, new points in, then the records."""
    for w in writes:
        if w.drop or (w.fresh and store.count_segments(SearchFilter(path=w.event.path))):
            store.delete_image(w.event.path)
    points = [p for w in writes for p in w.points]
    if points:
        store.upsert_segments(points)
    entries = [w.entry for w in writes if w.entry is not None]
    if entries:
        store.put_images(entries)


@dataclass
class _RunState:
    force: bool
    verify: bool
    # What this run decided but the store may not show yet; an entry goes once its write is committed,
    # so these hold the images in flight, not every image of the run.
    by_sha: dict[str, str] = field(default_factory=dict)  # content being indexed → its path
    replaced: set[str] = field(default_factory=set)  # paths whose old record is being dropped
    hashed: int = 0
    decoded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def committed(self, w: Write) -> None:
        if w.entry is not None and self.by_sha.get(w.entry.sha256) == w.event.path:
            del self.by_sha[w.entry.sha256]
        self.replaced.discard(w.event.path)


class Indexer:
    def __init__(
        self,
        store: VectorStore,
        segmenter: Segmenter,
        embedder: Embedder,
        *,
        max_image_pixels: int = 50_000_000,
        batch_images: int = 4,
        extensions: Sequence[str] = (".jpg", ".jpeg", ".png"),
        pipeline: bool = True,
        decode_threads: int = 4,
        image_batch: int | None = None,
        write_queue: int = 2,
        work_side: int | None = None,
    ) -> None:
        self.store = store
        self.segmenter = segmenter
        self.embedder = embedder
        self.max_image_pixels = max_image_pixels
        self.batch_images = max(1, batch_images)
        self.extensions = tuple(extensions)
        self.pipeline = pipeline
        self.decode_threads = max(1, decode_threads)
        # Images per segment_batch / embed_batch call: the segmenter's own encoder batch by default.
        self.image_batch = max(1, image_batch or int(getattr(segmenter, "image_batch", 1) or 1))
        self.write_queue = max(1, write_queue)  # commits waiting for the writer (back-pressure)
        self.work_side = work_side  # long side segmented and embedded at (``imaging.working_side``); None: full
        store.ensure(embedder.dim)

    def check_model(self) -> None:
        """Refuse to mix vector spaces in one collection."""
        for entry in self.store.iter_images():
            if entry.model != self.embedder.model_id:
                raise StoreError(
                    f"this collection holds segments embedded with '{entry.model}', but this run embeds "
                    f"with '{self.embedder.model_id}'. Use another collection (--collection), or --force "
                    "to re-embed every image with the new model."
                )
            return

    def _commit(self, batch: list[tuple[LoadedImage, list[SegmentPoint]]]) -> None:
        """Write processed images (used by the HTTP API's upload): points, then records."""
        commit(self.store, [
            Write(
                ImageEvent(lo.record.path, "indexed", len(pts)), points=pts,
                entry=ImageEntry(
                    lo.record.path, lo.record.sha256, lo.record.width, lo.record.height, len(pts),
                    self.embedder.model_id, now_iso(),
                ),
            )
            for lo, pts in batch
        ])
        batch.clear()

    def index(
        self,
        root: Path,
        *,
        prune: bool = False,
        force: bool = False,
        verify: bool = False,
        on_image: Callable[[ImageEvent], None] | None = None,
        on_total: Callable[[int], None] | None = None,
    ) -> IndexReport:
        """Index the images under ``root``. ``verify``: hash every file even when its size and mtime match
        its record; ``force``: re-index every file. ``on_image`` gets one event per file (and per folder
        that cannot be listed), on the calling thread."""
        started = time.perf_counter()
        report = IndexReport()
        if not force:
            self.check_model()
        if on_total:
            on_total(count_images(root, self.extensions))
        run = _RunState(force=force, verify=verify)

        def emit(event: ImageEvent) -> None:
            report.add(event)
            if on_image:
                on_image(event)

        try:
            with route_warnings():
                plans = self._plan_all(root, run)
                (self._run_pipelined if self.pipeline else self._run_sequential)(plans, run, emit)
            if prune:
                report.pruned_images, report.pruned_segments, report.pruned_orphans = self.prune(root)
        finally:
            report.hashed, report.decoded = run.hashed, run.decoded
            report.seconds = time.perf_counter() - started
        return report

    # Steps --------------------------------------------------------------------------------------------
    def _plan_all(self, root: Path, run: _RunState) -> Iterator[ImageEvent | _Candidate]:
        unlisted: list[ImageEvent] = []

        def on_error(folder: Path, reason: str) -> None:
            unlisted.append(ImageEvent(str(folder), "failed", reason=reason))

        for path in find_images(root, self.extensions, on_error=on_error):
            while unlisted:
                yield unlisted.pop(0)
            yield self._plan(path, run)
        yield from unlisted

    def _plan(self, path: Path, run: _RunState) -> ImageEvent | _Candidate:
        try:
            st = stat_file(path)
        except ImageReadError as e:
            return ImageEvent(str(path), "failed", reason=str(e))
        old = self.store.get_image(str(path))
        if old is not None and not (run.force or run.verify) and old.matches_stat(st.st_size, st.st_mtime_ns):
            return ImageEvent(str(path), "skipped", old.n_segments)
        return _Candidate(path, old)

    def _read(self, c: _Candidate, run: _RunState) -> ImageEvent | Write | _Read:
        try:
            data, st = read_file(c.path, max_file_bytes(self.max_image_pixels))
        except ImageReadError as e:  # unreadable now: keep what is indexed, the content is unknown
            return ImageEvent(str(c.path), "failed", reason=str(e))
        sha = sha256_bytes(data)
        with run.lock:
            run.hashed += 1
        old = c.old
        if old is not None and old.sha256 == sha and not run.force:
            skipped = ImageEvent(str(c.path), "skipped", old.n_segments)
            if old.matches_stat(st.st_size, st.st_mtime_ns):
                return skipped
            return Write(skipped, entry=replace(old, size=st.st_size, mtime_ns=st.st_mtime_ns))
        return _Read(c.path, old, data, sha, st)

    def _decide(self, r: _Read, run: _RunState) -> ImageEvent | Write | _Read:
        path = str(r.path)
        twin = run.by_sha.get(r.sha256) or next(
            (
                e.path for e in self.store.find_images(r.sha256)
                if e.path != path and e.path not in run.replaced and Path(e.path).exists()
            ),
            None,
        )
        if r.old is not None:  # its old content is gone, whatever happens next
            run.replaced.add(path)
        if twin is not None:
            # Point ids come from the content hash: a second copy would overwrite the first's points.
            event = ImageEvent(path, "duplicate", reason=f"same content as {twin}")
            return Write(event, drop=True) if r.old is not None else event
        run.by_sha[r.sha256] = path
        return r

    def _decode(self, r: _Read, run: _RunState) -> ImageEvent | Write | _Decoded:
        try:
            loaded = load_image(r.path, r.data, self.max_image_pixels, r.sha256)
            loaded = replace(loaded, pixels=fit_side(loaded.pixels, self.work_side))
        except ImageReadError as e:
            return self._failed(str(r.path), str(e), r.old)
        with run.lock:
            run.decoded += 1
        return _Decoded(loaded, r.old, r.stat)

    def _indexed(self, d: _Decoded, points: list[SegmentPoint]) -> Write:
        rec = d.loaded.record
        entry = ImageEntry(
            rec.path, rec.sha256, rec.width, rec.height, len(points), self.embedder.model_id, now_iso(),
            size=d.stat.st_size, mtime_ns=d.stat.st_mtime_ns,
        )
        event = ImageEvent(rec.path, "indexed", len(points), warnings=d.loaded.warnings)
        return Write(event, drop=d.old is not None, entry=entry, points=points, fresh=d.old is None)

    def _failed(self, path: str, reason: str, old: ImageEntry | None, warnings: list[str] | None = None) -> ImageEvent | Write:
        event = ImageEvent(path, "failed", reason=reason, warnings=warnings or [])
        return Write(event, drop=True) if old is not None else event  # the indexed version is outdated

    def _segment_embed(self, group: list[_Decoded]) -> list[Write | ImageEvent]:
        results = segment_and_embed(self.segmenter, self.embedder, [d.loaded for d in group])
        return [
            self._indexed(d, r) if isinstance(r, list) else self._failed(d.loaded.record.path, r, d.old, d.loaded.warnings)
            for d, r in zip(group, results)
        ]

    def _process_one(self, d: _Decoded) -> Write | ImageEvent:
        try:
            points = index_image(self.segmenter, self.embedder, d.loaded)
        except Exception as e:  # one bad image must not end a long run
            return self._failed(d.loaded.record.path, f"{type(e).__name__}: {e}", d.old, d.loaded.warnings)
        return self._indexed(d, points)

    # Runners ------------------------------------------------------------------------------------------
    def _run_sequential(
        self, plans: Iterable[ImageEvent | _Candidate], run: _RunState, emit: Callable[[ImageEvent], None]
    ) -> None:
        """The reference: each file through every step in turn, writes committed inline."""
        pending: list[Write] = []

        def flush() -> None:
            commit(self.store, pending)
            for w in pending:
                run.committed(w)
                emit(w.event)
            pending.clear()

        for item in plans:
            out: Any = item
            if isinstance(out, _Candidate):
                out = self._read(out, run)
            if isinstance(out, _Read):
                out = self._decide(out, run)
            if isinstance(out, _Read):
                out = self._decode(out, run)
            if isinstance(out, _Decoded):
                out = self._process_one(out)
            if isinstance(out, ImageEvent):
                emit(out)
                continue
            pending.append(out)
            if len(pending) >= self.batch_images:
                flush()
        flush()

    def _run_pipelined(
        self, plans: Iterable[ImageEvent | _Candidate], run: _RunState, emit: Callable[[ImageEvent], None]
    ) -> None:
        window = 2 * self.decode_threads + self.image_batch  # files in flight per pool stage
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="use-search-read") as pool:
            writer = _Writer(self.store, self.write_queue)
            try:
                reads = _ordered(pool, lambda c: self._read(c, run), plans, _Candidate, window)
                decided = (self._decide(x, run) if isinstance(x, _Read) else x for x in reads)
                decoded = _ordered(pool, lambda r: self._decode(r, run), decided, _Read, window)
                group: list[_Decoded] = []
                pending: list[Write] = []

                def route(items: Iterable[ImageEvent | Write]) -> None:
                    for x in items:
                        if isinstance(x, ImageEvent):
                            emit(x)
                        else:
                            pending.append(x)
                    if len(pending) >= self.batch_images:
                        writer.submit(list(pending))
                        pending.clear()

                for item in decoded:
                    for w in writer.committed():
                        run.committed(w)
                        emit(w.event)
                    if isinstance(item, _Decoded):
                        group.append(item)
                        if len(group) >= self.image_batch:
                            route(self._segment_embed(group))
                            group = []
                    else:
                        route([item])
                if group:
                    route(self._segment_embed(group))
                if pending:
                    writer.submit(list(pending))
            finally:
                writer.close()
                for w in writer.committed():
                    run.committed(w)
                    emit(w.event)
            writer.raise_error()

    def prune(self, root: Path) -> tuple[int, int, int]:
        """Remove what is indexed under ``root`` but gone from disk: image records whose file is gone
        (with their segments), and orphan segments whose path has neither a record nor a file (an
        interrupted run's leftovers). Returns (records, segments, orphan paths)."""
        return prune_store(self.store, root)


def prune_store(store: VectorStore, root: Path) -> tuple[int, int, int]:
    root_s = str(Path(root).absolute())
    below = root_s.rstrip("/") + "/"
    gone = [
        e.path for e in store.iter_images()
        if (e.path == root_s or e.path.startswith(below)) and not Path(e.path).exists()
    ]
    segments = sum(store.delete_image(p) for p in gone)
    candidates = [*store.segment_paths(SearchFilter(under=root_s)), *store.segment_paths(SearchFilter(path=root_s))]
    orphans = [p for p in dict.fromkeys(candidates) if not Path(p).exists() and store.get_image(p) is None]
    segments += sum(store.delete_image(p) for p in orphans)
    return len(gone), segments, len(orphans)


def _ordered(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], kind: type, window: int
) -> Iterator[Any]:
    """``fn`` over the items of type ``kind`` in the pool, others passed through; results in input
    order, at most ``window`` items in flight."""
    flight: deque[Future[Any]] = deque()
    for x in items:
        if isinstance(x, kind):
            flight.append(pool.submit(fn, x))
        else:
            done: Future[Any] = Future()
            done.set_result(x)
            flight.append(done)
        while len(flight) >= window or (flight and flight[0].done()):
            yield flight.popleft().result()
    while flight:
        yield flight.popleft().result()


_STOP = object()


class _Writer:
    """A thread that commits batches in order from a bounded queue (``submit`` blocks when it is full).

    The committed writes are handed back to the calling thread (``committed``). After a
    failed commit (e.g. the disk is full) it writes nothing more, and ``submit``/``raise_error``
    re-raise the error on the calling thread."""

    def __init__(self, store: VectorStore, depth: int) -> None:
        self.store = store
        self.jobs: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.done: queue.SimpleQueue[Write] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="use-search-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is _STOP:
                return
            if self.error is not None:
                continue
            try:
                commit(self.store, job)
            except BaseException as e:  # handed to the calling thread
                self.error = e
                continue
            for w in job:
                self.done.put(w)

    def submit(self, job: list[Write]) -> None:
        while True:
            self.raise_error()
            try:
                self.jobs.put(job, timeout=0.2)
                return
            except queue.Full:
                continue

    def committed(self) -> Iterator[Write]:
        while True:
            try:
                yield self.done.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        self.jobs.put(_STOP)
        self.thread.join()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error
