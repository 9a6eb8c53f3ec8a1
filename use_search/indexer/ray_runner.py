"""Distributed indexing on Ray Data: the same read → segment → embed → write stages and the same
commit rule as ``Indexer``, spread over a Ray cluster.

Two passes over the files:

1. **Plan**: the driver stats every file (``Planner.stat``, the rules ``Indexer`` uses, see
   ``indexer/plan.py``); Ray tasks read and hash the files that need it; the driver then decides each
   file in sorted file order (``Planner.decide``): failed, skipped (a record with another size/mtime is
   refreshed), a copy of known content (a new reference, written before the pipeline runs; a copy of
   content this run indexes is written after it), or changed / new content for the pipeline.
2. **Index** (one streaming Ray Data pipeline): read in CPU tasks → decode + segment + embed in an
   actor pool (one GPU per actor when the cluster has GPUs) → batched writes. The actors run the
   single-process indexer's segment+embed stage with the parts it uses (``build_parts``: the CLI hands
   ``factory.engine_parts``), so Ray only distributes that stage; they decode (``load_image``) straight
   to the working size, which only the segmenter knows (only compressed bytes travel to them). Writes: to the embedded store from the driver (it owns the store's
   exclusive lock: a single writer); to a Qdrant server from a small pool of writer actors, each
   with its own connection. Either way a batch's segment points are upserted before its image
   records, so an interrupted run leaves no image that looks done but is not.

Decode ‖ GPU ‖ upsert overlap comes from Ray Data's streaming executor: each stage works on the next
blocks while the later stages work on earlier ones, with backpressure bounding the memory in flight.

The model id and vector size are learnt from the first results, so the driver never loads a model:
the first write checks that the collection holds vectors of the same model (``plan.check_model``)
and creates the collections (``ensure``).
"""

from __future__ import annotations

import base64
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from use_search.config import Settings
from use_search.indexer.plan import (
    Candidate, Emit, ImageEvent, IndexReport, Planner, Runner, Write, check_model, commit, now_iso,
)
from use_search.indexer.read import (
    ImageReadError, LoadedImage, find_images, load_image, max_file_bytes, read_file, route_warnings, sha256_bytes,
)
from use_search.indexer.runner import EngineParts, segment_and_embed
from use_search.store.base import ImageEntry, VectorStore
from use_search.types import SegmentPoint

PartsBuilder = Callable[[Settings], EngineParts]  # module-level (Ray pickles it): factory.engine_parts


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # ray.init's: "local" (new local Ray), "auto" (running cluster), "ray://host:10001";
    # None: RAY_ADDRESS if set, else a local one
    num_actors: int | None = None  # segment+embed actors; default: the cluster's GPUs, or 1 without GPUs
    gpus_per_actor: float = 1.0  # used when the cluster has GPUs and settings.device is not "cpu"
    cpus_per_actor: float = 1.0
    actor_batch: int = 8  # images per actor call (one segment_batch)
    cpus_per_read: float = 0.5  # per read task (differs from cpus_per_actor so that Ray Data does not
    # fuse reading into the actors: file I/O stays in parallel tasks, off the GPU processes)
    driver_plan_below: int = 64  # hash in the driver when there are fewer files (a Ray job costs seconds)
    write_batch: int | None = None  # images per commit; default settings.batch_images
    server_writers: int = 2  # writer actors for the server backend; 0: the driver writes
    torch_threads: int | None = None  # torch.set_num_threads in the actors (Ray sets OMP threads = CPUs)
    quiet: bool = True  # Ray Data's progress bars and INFO logs off (the CLI shows its own progress)
    init_kwargs: dict[str, Any] = field(default_factory=dict)  # extra ray.init arguments


# ---------------------------------------------------------------------------------------------------
# Stage functions (run in Ray tasks and actors; plain functions so they are tested without Ray)
# ---------------------------------------------------------------------------------------------------
def hash_row(row: dict[str, Any], max_pixels: int) -> dict[str, Any]:
    """Plan pass: {path} → {path, sha256, error, size, mtime_ns} (regular files only)."""
    path = row["path"]
    try:
        data, st = read_file(Path(path), max_file_bytes(max_pixels))
    except ImageReadError as e:
        return {"path": path, "sha256": "", "error": str(e), "size": -1, "mtime_ns": -1}
    if not data:
        return {"path": path, "sha256": "", "error": "empty file", "size": -1, "mtime_ns": -1}
    return {"path": path, "sha256": sha256_bytes(data), "error": "", "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_row(row: dict[str, Any], max_pixels: int) -> dict[str, Any]:
    """Index pass, read stage: {path, replace} → the file's bytes and size/mtime, or an error."""
    out = {"path": row["path"], "replace": bool(row["replace"]), "data": b"", "size": -1, "mtime_ns": -1}
    try:
        data, st = read_file(Path(row["path"]), max_file_bytes(max_pixels))
    except ImageReadError as e:
        return {**out, "error": str(e)}
    return {**out, "data": data, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "error": ""}


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


def _columns(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, list[Any]]:
    return {k: [r[k] for r in rows] for k in keys}


RESULT_KEYS = (
    "path", "replace", "sha256", "width", "height", "size", "mtime_ns", "warnings", "error", "model", "dim",
    "points", "vectors",
)


class SegmentEmbed:
    """Actor: decode, segment and embed a batch of read files with the single-process indexer's parts
    and stage (``build_parts``, ``segment_and_embed``). One output row per image: its points (ids and
    payloads as JSON, float32 vectors as base64) or its error; one bad image does not fail the rest."""

    def __init__(self, settings: Settings, build_parts: PartsBuilder, torch_threads: int | None = None) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.max_pixels = settings.max_image_pixels
        self.segmenter, self.embedder, self.side = build_parts(settings)

    def _decode(self, row: dict[str, Any]) -> LoadedImage | str:
        if row["error"]:
            return str(row["error"])
        try:
            with route_warnings():  # an actor call runs alone in its worker's thread
                return load_image(Path(str(row["path"])), bytes(row["data"]), self.max_pixels, side=self.side)
        except ImageReadError as e:
            return str(e)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out = []
        rows = _rows(batch)
        decoded = [self._decode(r) for r in rows]
        ok = [i for i, d in enumerate(decoded) if isinstance(d, LoadedImage)]
        loaded = [decoded[i] for i in ok]
        results: dict[int, dict[str, Any]] = {
            i: {"error": d} for i, d in enumerate(decoded) if isinstance(d, str)
        }
        for i, points in zip(ok, segment_and_embed(self.segmenter, self.embedder, loaded)):  # type: ignore[arg-type]
            if isinstance(points, str):  # as Indexer: report the image, go on
                results[i] = {"error": points}
                continue
            vectors = np.asarray([p.vector for p in points], dtype=np.float32).reshape(len(points), self.embedder.dim)
            results[i] = {
                "points": json.dumps([[p.id, p.payload] for p in points]),
                "vectors": base64.b64encode(vectors.tobytes()).decode("ascii"),
            }
        for i, (r, d) in enumerate(zip(rows, decoded)):
            res = {
                "path": str(r["path"]), "replace": bool(r["replace"]), "sha256": "", "width": 0, "height": 0,
                "size": int(r["size"]), "mtime_ns": int(r["mtime_ns"]), "warnings": "", "error": "",
                "model": self.embedder.model_id, "dim": int(self.embedder.dim), "points": "[]", "vectors": "",
            }
            if isinstance(d, LoadedImage):
                rec = d.record
                res.update(sha256=rec.sha256, width=rec.width, height=rec.height, warnings="\n".join(d.warnings))
            res.update(results.get(i, {}))
            out.append(res)
        return _columns(out, RESULT_KEYS)


def decode_points(row: dict[str, Any]) -> list[SegmentPoint]:
    pairs = json.loads(str(row["points"]))
    if not pairs:
        return []
    raw = base64.b64decode(str(row["vectors"]))
    vectors = np.frombuffer(raw, dtype=np.float32).reshape(len(pairs), int(row["dim"]))
    return [SegmentPoint(id=pid, vector=vectors[k], payload=payload) for k, (pid, payload) in enumerate(pairs)]


EVENT_KEYS = ("path", "status", "segments", "reason", "warnings")


class StoreWriter:
    """Write result rows with the commit rule: all segment points of a batch, then its image records.

    Before its first write it refuses a collection filled by another model (unless ``force``:
    ``plan.check_model``) and creates the collections for the vector size. A file that changed
    since it was indexed (``replace``) loses its old segments just before its new ones are written.
    """

    def __init__(self, store: VectorStore, force: bool = False) -> None:
        self.store = store
        self.force = force
        self._ready = False

    def _prepare(self, model: str, dim: int) -> None:
        if self._ready:
            return
        if not self.force:
            check_model(self.store, model)
        self.store.ensure(dim)
        self._ready = True

    def write(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        writes: list[Write] = []
        model_dim: tuple[str, int] | None = None
        for row in rows:
            path, warnings = str(row["path"]), [w for w in str(row["warnings"]).split("\n") if w]
            if row["error"]:  # as Indexer: a changed file that fails loses its outdated record
                event = ImageEvent(path, "failed", reason=str(row["error"]), warnings=warnings)
                writes.append(Write(event, drop=bool(row["replace"])))
                continue
            points = decode_points(row)
            model_dim = model_dim or (str(row["model"]), int(row["dim"]))
            size, mtime = int(row["size"]), int(row["mtime_ns"])
            entry = ImageEntry(
                path, str(row["sha256"]), int(row["width"]), int(row["height"]), len(points), str(row["model"]),
                now_iso(), size=size if size >= 0 else None, mtime_ns=mtime if size >= 0 else None,
            )
            event = ImageEvent(path, "indexed", len(points), warnings=warnings)
            writes.append(Write(event, drop=bool(row["replace"]), entry=entry, points=points))
        if model_dim is not None:
            self._prepare(*model_dim)
        commit(self.store, writes)
        return [
            {"path": w.event.path, "status": w.event.status, "segments": w.event.segments, "reason": w.event.reason,
             "warnings": "\n".join(w.event.warnings)}
            for w in writes
        ]


class WriterActor:
    """Actor for the server backend: its own Qdrant connection, the same ``StoreWriter``."""

    def __init__(self, settings: Settings, force: bool = False, store_factory: Callable[[Settings], VectorStore] | None = None) -> None:
        from use_search.store import open_store

        self.store = (store_factory or open_store)(settings)
        self.writer = StoreWriter(self.store, force)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        return _columns(self.writer.write(_rows(batch)), EVENT_KEYS)


# ---------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    todo: list[tuple[str, bool]] = field(default_factory=list)  # (path, replace: an old version is indexed)
    events: list[ImageEvent] = field(default_factory=list)  # failed / skipped, in file order
    writes: list[Write] = field(default_factory=list)  # refreshed records, copies of stored content, dropped outdated ones
    after: list[Write] = field(default_factory=list)  # copies of content this run indexes: written after it


def plan_stat(
    store: VectorStore, paths: Iterable[str], *, force: bool = False, verify: bool = False, planner: Planner | None = None
) -> tuple[list[str], list[ImageEvent]]:
    """The stat pass (``Planner.stat``): (paths to hash, events of files failed or skipped unread)."""
    planner = planner or Planner(store, force=force, verify=verify)
    todo: list[str] = []
    events: list[ImageEvent] = []
    for path in paths:
        out = planner.stat(Path(path))
        if isinstance(out, Candidate):
            todo.append(path)
        else:
            events.append(out)
    return todo, events


def plan(store: VectorStore, hashed: Iterable[dict[str, Any]], *, force: bool = False, planner: Planner | None = None) -> Plan:
    """Each hashed file's fate (``Planner.decide``), from (path, sha256, error, size, mtime_ns) rows in file order."""
    planner = planner or Planner(store, force=force)
    out = Plan()
    for row in hashed:
        path, sha = str(row["path"]), str(row["sha256"])
        if row["error"]:
            out.events.append(ImageEvent(path, "failed", reason=str(row["error"])))
            continue
        old = store.get_image(path)
        decided = planner.decide(path, sha, int(row.get("size", -1)), int(row.get("mtime_ns", -1)), old)
        if decided is None:
            out.todo.append((path, old is not None))
        elif isinstance(decided, ImageEvent):
            out.events.append(decided)
        else:
            (out.after if decided.first else out.writes).append(decided)
    return out


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------
def _events(batch: dict[str, Any]) -> Iterator[ImageEvent]:
    for r in _rows(batch):
        warnings = [w for w in str(r["warnings"]).split("\n") if w]
        yield ImageEvent(str(r["path"]), str(r["status"]), int(r["segments"]), str(r["reason"]), warnings)  # type: ignore[arg-type]


class RayIndexer(Runner):
    """``Runner.index`` on a Ray cluster (``options.address``; a local one by default), segmenting and
    embedding with the parts ``build_parts(settings)`` gives each actor.

    ``store`` is the driver's handle: it plans, prunes, and for the embedded backend (or with
    ``server_writers=0``) it is the single writer. With the server backend and writer actors, each
    actor opens its own connection from ``settings``.
    """

    def __init__(self, settings: Settings, store: VectorStore, build_parts: PartsBuilder, options: RayOptions | None = None) -> None:
        self.settings = settings
        self.store = store
        self.build_parts = build_parts
        self.options = options or RayOptions()
        self._force = False

    @contextmanager
    def _session(self, force: bool) -> Iterator[None]:
        """Ray for the run: started here (and shut down after) unless the caller already started it."""
        import ray
        import ray.data

        self._force = force
        opts = self.options
        own_ray = not ray.is_initialized()
        if own_ray:
            quiet = {"log_to_driver": False, "logging_level": logging.WARNING} if opts.quiet else {}
            ray.init(address=opts.address, **{**quiet, **opts.init_kwargs})
        try:
            if opts.quiet:
                ray.data.DataContext.get_current().enable_progress_bars = False
                logging.getLogger("ray.data").setLevel(logging.WARNING)
            yield
        finally:
            if own_ray:
                ray.shutdown()

    def _run(
        self, root: Path, planner: Planner, emit: Emit, report: IndexReport, on_total: Callable[[int], None] | None
    ) -> None:
        """The two passes of the module's docstring: plan in the driver (hashing in Ray tasks), then the
        pipeline for new content; copies of that content are committed after it."""
        to_hash = self._stat(root, planner, emit, on_total)
        report.hashed = len(to_hash)
        if not to_hash:
            return
        decided = plan(self.store, self._hash(to_hash), planner=planner)
        for ev in decided.events:
            emit(ev)
        commit(self.store, decided.writes, planner.keep)
        for w in decided.writes:
            planner.committed(w)
            emit(w.event)
        report.decoded = len(decided.todo)
        failed: dict[str, str] = {}
        for ev in self._pipeline(decided.todo):
            if ev.status == "failed":
                failed[ev.path] = ev.reason
            emit(ev)
        reasons = {sha: failed[p] for sha, p in planner.by_sha.items() if p in failed}
        commit(self.store, decided.after, planner.keep, reasons)
        for w in decided.after:
            emit(w.event)

    def _stat(self, root: Path, planner: Planner, emit: Emit, on_total: Callable[[int], None] | None) -> list[str]:
        """List and stat the files: the paths to hash; the others' events are emitted."""
        unlisted: list[ImageEvent] = []
        files = [
            str(p) for p in find_images(
                root, self.settings.image_extensions,
                on_error=lambda folder, reason: unlisted.append(ImageEvent(str(folder), "failed", reason=reason)),
            )
        ]
        if on_total:
            on_total(len(files))
        to_hash, fast = plan_stat(self.store, files, planner=planner)
        for ev in [*unlisted, *fast]:
            emit(ev)
        return to_hash

    def _hash(self, paths: list[str]) -> list[dict[str, Any]]:
        """``hash_row`` of each path, in order: in the driver for a few files, else in Ray tasks."""
        max_pixels = self.settings.max_image_pixels
        if len(paths) < self.options.driver_plan_below:
            return [hash_row({"path": p}, max_pixels) for p in paths]
        import ray.data

        hashed = ray.data.from_items([{"path": p} for p in paths]).map(
            hash_row, fn_kwargs={"max_pixels": max_pixels}, num_cpus=self.options.cpus_per_read
        )
        by_path = {str(r["path"]): r for r in hashed.iter_rows()}
        return [by_path[p] for p in paths]

    def _pipeline(self, todo: list[tuple[str, bool]]) -> Iterator[ImageEvent]:
        if not todo:
            return iter(())
        import ray

        return _run_pipeline(ray, self.settings, self.store, todo, self.options, self.build_parts, self._force)


def index_with_ray(
    settings: Settings,
    store: VectorStore,
    root: Path,
    *,
    build_parts: PartsBuilder,
    options: RayOptions | None = None,
    **run: Any,
) -> IndexReport:
    """Index ``root`` into ``store`` on a Ray cluster: ``RayIndexer(...).index(root, **run)``, ``run``
    being ``Runner.index``'s options (prune, force, verify, on_image, on_total). The CLI hands
    ``factory.engine_parts`` as ``build_parts``, the single-process indexer's parts."""
    return RayIndexer(settings, store, build_parts, options).index(root, **run)


def _run_pipeline(
    ray: Any,
    settings: Settings,
    store: VectorStore,
    todo: list[tuple[str, bool]],
    opts: RayOptions,
    build_parts: PartsBuilder,
    force: bool,
) -> Iterator[ImageEvent]:
    gpus = float(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and settings.device != "cpu"
    actors = opts.num_actors or (max(1, int(gpus // opts.gpus_per_actor)) if use_gpu else 1)
    write_batch = max(1, opts.write_batch or settings.batch_images)

    ds = ray.data.from_items([{"path": p, "replace": r} for p, r in todo])
    ds = ds.map(read_row, fn_kwargs={"max_pixels": settings.max_image_pixels}, num_cpus=opts.cpus_per_read)
    ds = ds.map_batches(
        SegmentEmbed,
        fn_constructor_kwargs={"settings": settings, "build_parts": build_parts, "torch_threads": opts.torch_threads},
        batch_size=max(1, opts.actor_batch),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=opts.cpus_per_actor,
        num_gpus=opts.gpus_per_actor if use_gpu else 0,
    )
    if settings.store.backend == "server" and opts.server_writers > 0:
        ds = ds.map_batches(
            WriterActor,
            fn_constructor_kwargs={"settings": settings, "force": force},
            batch_size=write_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=opts.server_writers),
            num_cpus=0.25,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield from _events(batch)
        return
    writer = StoreWriter(store, force)
    for batch in ds.iter_batches(batch_size=write_batch, batch_format="numpy"):
        yield from _events(_columns(writer.write(_rows(batch)), EVENT_KEYS))
