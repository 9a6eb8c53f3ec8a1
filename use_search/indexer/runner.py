"""The indexer: plan → read → segment → embed → write, committed in small batches.

Every file goes through the plan's rules (``indexer/plan.py``: stat, hash where needed, decide), in file
order; only new content is decoded, segmented and embedded, and the models are built on the first
such file, so a rerun that finds nothing new loads none.

Consistency rule (see ``store/base.py``): a content's points are written, listing the path, before the
path's record, so an interrupted run never leaves an image that looks done but is not; the rerun
redoes it and its deterministic point ids overwrite whatever part was written.

Two runners chain these steps. ``pipeline=False`` is the reference: one file at a time, one
``segment``/``embed_segments`` call per image, writes inline. The pipelined runner (default) reads,
hashes and decodes in a thread pool (PIL and hashlib release the GIL) in a bounded, ordered window,
segments and embeds ``image_batch`` images per ``segment_batch``/``embed_batch`` call, and hands
commits to a writer thread through a bounded queue, so decode ‖ model ‖ upsert overlap while host
memory stays bounded whatever the number of images (the file list is streamed too). Decisions are
taken in file order on the calling thread and writes are committed in file order, so both runners
give the same points.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from use_search.imaging import to_original
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
)
from use_search.indexer.plan import (
    Candidate, Emit, ImageEvent, IndexReport, Planner, Runner, Write, batch_full, check_model, commit, now_iso,
)
from use_search.indexer.prune import prune_store
from use_search.model.base import Embedder
from use_search.store.base import ImageEntry, VectorStore, segment_payload
from use_search.types import Segment, SegmentPoint, Segmenter, point_id

__all__ = ["ImageEvent", "IndexReport", "Indexer", "Write", "commit", "now_iso", "prune_store", "segment_points"]
# The segment+embed stage's parts: the segmenter, the embedder and the working size (the long side
# images are decoded to, ``imaging.working_side``; None: full size). ``factory.engine_parts`` builds them
# for every runner: this indexer, Ray's actors, the API's worker, eval.
EngineParts = tuple[Segmenter, Embedder, "int | None"]
Parts = Callable[[], EngineParts]


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
                paths=[rec.path], sha256=rec.sha256, width=rec.width, height=rec.height,
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
    try:
        segmented = list(segmenter.segment_batch(pixels))
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
class _Read:  # read and hashed: new or changed content
    path: Path
    old: ImageEntry | None
    data: bytes
    sha256: str | None  # None: an empty file
    stat: os.stat_result


@dataclass
class _Decoded:
    loaded: LoadedImage
    old: ImageEntry | None
    stat: os.stat_result


class Indexer(Runner):
    """Indexes folders into ``store``. The segmenter and embedder are given, or built by ``build`` on the
    first file that needs them (``Runtime.indexer`` does this: a run with nothing new loads no model)."""

    def __init__(
        self,
        store: VectorStore,
        segmenter: Segmenter | None = None,
        embedder: Embedder | None = None,
        *,
        build: Parts | None = None,
        max_image_pixels: int = 50_000_000,
        batch_images: int = 4,
        extensions: Sequence[str] = (".jpg", ".jpeg", ".png"),
        pipeline: bool = True,
        decode_threads: int = 4,
        image_batch: int | None = None,
        write_queue: int = 2,
        work_side: int | None = None,
    ) -> None:
        if (segmenter is None or embedder is None) and build is None:
            raise ValueError("Indexer needs a segmenter and an embedder, or build() to make them")
        self.store = store
        self._segmenter, self._embedder, self._build = segmenter, embedder, build
        self.max_image_pixels = max_image_pixels
        self.batch_images = max(1, batch_images)
        self.extensions = tuple(extensions)
        self.pipeline = pipeline
        self.decode_threads = max(1, decode_threads)
        self._image_batch = image_batch
        self.write_queue = max(1, write_queue)  # commits waiting for the writer (back-pressure)
        self._work_side = work_side
        self._building = threading.Lock()  # decode threads and the segment stage may ask at once
        self._check = True  # refuse another model's collection when the models are built (not with --force)
        if segmenter is not None and embedder is not None:
            self._ready()

    # Models, built on first use ------------------------------------------------------------------------
    @property
    def segmenter(self) -> Segmenter:
        with self._building:
            if self._segmenter is None:
                self._segmenter, self._embedder, self._work_side = self._build()  # type: ignore[misc]
                self._ready()
        return self._segmenter  # type: ignore[return-value]

    @property
    def work_side(self) -> int | None:
        """The long side images are decoded, segmented and embedded at (``imaging.working_side``; None:
        full size). With models built on first use it is theirs, so asking builds them: the first
        image to decode needs it as much as the first to segment."""
        if self._segmenter is None:
            self.segmenter  # noqa: B018 - builds the models, which fix the working size
        return self._work_side

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self.segmenter  # noqa: B018 - builds both
        return self._embedder  # type: ignore[return-value]

    @property
    def image_batch(self) -> int:
        """Images per segment_batch / embed_batch call: the segmenter's own encoder batch by default."""
        if self._image_batch is None:
            return max(1, self.segmenter.image_batch)
        return max(1, self._image_batch)

    def _ready(self) -> None:
        if self._check:
            self.check_model()
        self.store.ensure(self._embedder.dim)  # type: ignore[union-attr]

    def check_model(self) -> None:
        """Refuse to mix vector spaces in one collection."""
        check_model(self.store, self._embedder.model_id)  # type: ignore[union-attr]

    # The run (``Runner.index``) -------------------------------------------------------------------------
    @contextmanager
    def _session(self, force: bool) -> Iterator[None]:
        self._check = not force
        if self._embedder is not None and not force:
            self.check_model()
        yield

    def _run(
        self, root: Path, planner: Planner, emit: Emit, report: IndexReport, on_total: Callable[[int], None] | None
    ) -> None:
        self._hashed = self._decoded = 0
        try:
            if on_total:
                on_total(count_images(root, self.extensions))
            with route_warnings():
                plans = self._plan_all(root, planner)
                (self._run_pipelined if self.pipeline else self._run_sequential)(plans, planner, emit)
        finally:
            report.hashed, report.decoded = self._hashed, self._decoded

    _hashed = _decoded = 0

    # Steps --------------------------------------------------------------------------------------------
    def _plan_all(self, root: Path, run: Planner) -> Iterator[ImageEvent | Candidate]:
        unlisted: list[ImageEvent] = []

        def on_error(folder: Path, reason: str) -> None:
            unlisted.append(ImageEvent(str(folder), "failed", reason=reason))

        for path in find_images(root, self.extensions, on_error=on_error):
            while unlisted:
                yield unlisted.pop(0)
            yield run.stat(path)
        yield from unlisted

    def _read(self, c: Candidate, run: Planner) -> ImageEvent | _Read:
        try:
            data, st = read_file(c.path, max_file_bytes(self.max_image_pixels))
        except ImageReadError as e:  # unreadable now: keep what is indexed, the content is unknown
            return ImageEvent(str(c.path), "failed", reason=str(e))
        with run.lock:
            self._hashed += 1
        return _Read(c.path, c.old, data, sha256_bytes(data) if data else None, st)

    def _decide(self, r: _Read, run: Planner) -> ImageEvent | Write | _Read:
        out = run.decide(str(r.path), r.sha256, r.stat.st_size, r.stat.st_mtime_ns, r.old)
        return r if out is None else out

    def _decode(self, r: _Read, run: Planner) -> ImageEvent | Write | _Decoded:
        try:
            loaded = load_image(r.path, r.data, self.max_image_pixels, r.sha256, self.work_side)
        except ImageReadError as e:
            return run.failed(str(r.path), str(e), r.old, sha=r.sha256)
        with run.lock:
            self._decoded += 1
        return _Decoded(loaded, r.old, r.stat)

    def _indexed(self, d: _Decoded, points: list[SegmentPoint]) -> Write:
        rec = d.loaded.record
        entry = ImageEntry(
            rec.path, rec.sha256, rec.width, rec.height, len(points), self.embedder.model_id, now_iso(),
            size=d.stat.st_size, mtime_ns=d.stat.st_mtime_ns,
        )
        event = ImageEvent(rec.path, "indexed", len(points), warnings=d.loaded.warnings)
        return Write(event, drop=d.old is not None, entry=entry, points=points)

    def _segment_embed(self, group: list[_Decoded], run: Planner) -> list[Write | ImageEvent]:
        results = segment_and_embed(self.segmenter, self.embedder, [d.loaded for d in group])
        return [
            self._indexed(d, r) if isinstance(r, list)
            else run.failed(d.loaded.record.path, r, d.old, d.loaded.warnings, d.loaded.record.sha256)
            for d, r in zip(group, results)
        ]

    def _process_one(self, d: _Decoded, run: Planner) -> Write | ImageEvent:
        try:
            points = index_image(self.segmenter, self.embedder, d.loaded)
        except Exception as e:  # one bad image must not end a long run
            return run.failed(d.loaded.record.path, f"{type(e).__name__}: {e}", d.old, d.loaded.warnings, d.loaded.record.sha256)
        return self._indexed(d, points)

    # Runners ------------------------------------------------------------------------------------------
    def _run_sequential(
        self, plans: Iterable[ImageEvent | Candidate], run: Planner, emit: Emit
    ) -> None:
        """The reference: each file through every step in turn, writes committed inline."""
        pending: list[Write] = []

        def flush() -> None:
            commit(self.store, pending, run.keep, run.failures)
            for w in pending:
                run.committed(w)
                emit(w.event)
            pending.clear()

        for item in plans:
            out: Any = item
            if isinstance(out, Candidate):
                out = self._read(out, run)
            if isinstance(out, _Read):
                out = self._decide(out, run)
            if isinstance(out, _Read):
                out = self._decode(out, run)
            if isinstance(out, _Decoded):
                out = self._process_one(out, run)
            if isinstance(out, ImageEvent):
                emit(out)
                continue
            pending.append(out)
            if batch_full(pending, self.batch_images):
                flush()
        flush()

    def _run_pipelined(
        self, plans: Iterable[ImageEvent | Candidate], run: Planner, emit: Emit
    ) -> None:
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="use-search-read") as pool:
            writer = _Writer(self.write_queue, lambda job: commit(self.store, job, run.keep, run.failures))
            try:
                # Files in flight per pool stage; the models' batch joins in once they are built.
                def window() -> int:
                    built = self._image_batch or (self._segmenter.image_batch if self._segmenter else 1)
                    return 2 * self.decode_threads + max(1, built)

                reads = _ordered(pool, lambda c: self._read(c, run), plans, Candidate, window)
                decided = (self._decide(x, run) if isinstance(x, _Read) else x for x in reads)
                decoded = _ordered(pool, lambda r: self._decode(r, run), decided, _Read, window)
                group: list[_Decoded] = []
                later: list[Write] = []  # writes after the group's, kept in file order
                pending: list[Write] = []

                def route(items: Iterable[ImageEvent | Write]) -> None:
                    for x in items:
                        if isinstance(x, ImageEvent):
                            emit(x)
                        else:
                            pending.append(x)
                    if batch_full(pending, self.batch_images):
                        writer.submit(list(pending))
                        pending.clear()

                def flush_group() -> None:
                    route(self._segment_embed(group, run))
                    route(later)
                    group.clear()
                    later.clear()

                for item in decoded:
                    for w in writer.committed():
                        run.committed(w)
                        emit(w.event)
                    if isinstance(item, _Decoded):
                        group.append(item)
                        if len(group) >= self.image_batch:
                            flush_group()
                    elif isinstance(item, Write) and group:
                        later.append(item)
                    else:
                        route([item])
                if group:
                    flush_group()
                if pending:
                    writer.submit(list(pending))
            finally:
                writer.close()
                for w in writer.committed():
                    run.committed(w)
                    emit(w.event)
            writer.raise_error()

def _ordered(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], kind: type, window: Callable[[], int]
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
        while len(flight) >= window() or (flight and flight[0].done()):
            yield flight.popleft().result()
    while flight:
        yield flight.popleft().result()


_STOP = object()


class _Writer:
    """A thread that commits batches in order from a bounded queue (``submit`` blocks when it is full).

    The committed writes are handed back to the calling thread (``committed``). After a
    failed commit (e.g. the disk is full) it writes nothing more, and ``submit``/``raise_error``
    re-raise the error on the calling thread."""

    def __init__(self, depth: int, commit: Callable[[list[Write]], None]) -> None:
        self.commit = commit
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
                self.commit(job)
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
