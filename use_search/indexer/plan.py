"""The plan: what each file needs, decided from the store and the file system before any model is built.
``Indexer`` and the Ray runner both decide through ``Planner`` and write through ``commit``.

Per file, in file order:

1. **stat** (``Planner.stat``): not a regular file → failed. The path's record has the same size and mtime
   and its content's points list the path (one indexed count) → skipped without opening the file
   (``verify`` and ``force`` turn this off). Otherwise the file is read and hashed.
2. **decide** (``Planner.decide``), from the hash:
   - an empty file → failed (every one: identical bad files are each reported);
   - the record's content → skipped; its size/mtime are refreshed, and a missing reference is restored
     (or, if the content's points are gone too, the file is indexed again: the rerun repairs it);
   - content indexed earlier in this run, or already in the store under any path, present or gone →
     a **copy**: the path becomes one more reference to those points, with no decode, segmenting or
     embedding (a moved or copied library costs its hashing only);
   - otherwise new content → decode, segment, embed.
3. **commit** (``commit``), batch by batch in file order: a path whose content changed or that is gone
   loses its record, then its reference (the content's points go when no path refers to them, unless a
   copy planned in this run still needs them); new points are written listing their path; then the
   records; a copy gets its reference, then its record.

When nothing needs segmenting no model is loaded at all: the runners build them on the first image
that does.

``Runner`` is what every runner shares around these steps: a run's options, its report and events, the
clean-up of contents kept for copies, and the prune; ``check_model`` is the rule that keeps one model's
vectors per collection.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Collection, Iterator, Literal, Mapping, Sequence

from use_search.indexer.prune import prune_store
from use_search.indexer.read import ImageReadError, stat_file
from use_search.store.base import ImageEntry, SearchFilter, StoreError, VectorStore, references
from use_search.types import SegmentPoint

Status = Literal["indexed", "skipped", "failed", "copy"]
MAX_WRITES_PER_COMMIT = 256


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    copies: int = 0  # files whose content was already known: referenced, not segmented again
    segments: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (path, message): indexed all the same
    pruned_images: int = 0
    pruned_segments: int = 0
    pruned_orphans: int = 0  # paths referenced by segments but with neither a record nor a file
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
        elif ev.status == "copy":
            self.copies += 1
        elif ev.status == "indexed":
            self.indexed += 1
            self.segments += ev.segments
        self.warnings.extend((ev.path, w) for w in ev.warnings)


@dataclass
class Candidate:
    """A file the plan must read and hash."""

    path: Path
    old: ImageEntry | None


@dataclass
class Write:
    """One path's change to the store, and the event reported once it is committed."""

    event: ImageEvent
    drop: bool = False  # delete the path's record and its reference (its content changed, or it is gone)
    entry: ImageEntry | None = None  # the record to write, after ``points`` (a copy: None until committed)
    points: list[SegmentPoint] = field(default_factory=list)  # new content's points, listing this path
    copy_of: str | None = None  # a known content this path refers to: a reference instead of points
    stat: tuple[int, int] | None = None  # a copy's (size, mtime_ns), for its record
    first: str = ""  # a copy of content indexed in this run: the path that indexes it
    kept: bool = False  # a copy of stored content, which the run keeps until this write is committed


class Planner:
    """The plan's rules for one run. ``decide`` is called in file order on one thread; ``committed`` as
    writes land (the run's in-flight state then shrinks again)."""

    def __init__(self, store: VectorStore, *, force: bool = False, verify: bool = False) -> None:
        self.store = store
        self.force = force
        self.verify = verify
        self.lock = threading.Lock()
        self.by_sha: dict[str, str] = {}  # content indexed in this run, not yet committed → its path
        self.keep: Counter[str] = Counter()  # known contents that planned copies will refer to
        self.kept: set[str] = set()  # every content ``keep`` held during the run (see ``collect``)
        self.failures: dict[str, str] = {}  # content → why indexing it failed in this run

    def listed(self, entry: ImageEntry) -> bool:
        """The record's content has all its points and they list its path (one indexed count)."""
        flt = SearchFilter(path=entry.path, sha256=entry.sha256)
        return self.store.count_segments(flt) == entry.n_segments

    def stat(self, path: Path) -> ImageEvent | Candidate:
        try:
            st = stat_file(path)
        except ImageReadError as e:
            return ImageEvent(str(path), "failed", reason=str(e))
        old = self.store.get_image(str(path))
        if old is not None and not (self.force or self.verify) and old.matches_stat(st.st_size, st.st_mtime_ns):
            if self.listed(old):
                return ImageEvent(str(path), "skipped", old.n_segments)
        return Candidate(path, old)

    def decide(self, path: str, sha: str | None, size: int, mtime_ns: int, old: ImageEntry | None) -> ImageEvent | Write | None:
        """A read file's fate: an event, a write, or None (new content: decode, segment and embed it).
        ``sha`` None: the file is empty."""
        if sha is None:
            return self.failed(path, "empty file", old)
        if old is not None and old.sha256 == sha and not self.force:
            skipped = ImageEvent(path, "skipped", old.n_segments)
            if self.listed(old):
                if old.matches_stat(size, mtime_ns):
                    return skipped
                return Write(skipped, entry=replace(old, size=size, mtime_ns=mtime_ns))
            if self._complete(sha, old.n_segments):  # the points are there but do not list this path
                return Write(skipped, copy_of=sha, entry=replace(old, size=size, mtime_ns=mtime_ns))
            # Its points are gone: index it again (the rerun repairs what a crash or a bug lost).
        first = self.by_sha.get(sha)
        if first is not None:
            event = ImageEvent(path, "copy", reason=f"same content as {first}")
            return Write(event, drop=old is not None, copy_of=sha, stat=(size, mtime_ns), first=first)
        if not self.force:
            with self.lock:  # before looking: a drop committed meanwhile then keeps the points
                self.keep[sha] += 1
                self.kept.add(sha)
            known = self._known(sha)
            if known is not None:
                entry = replace(known, path=path, size=size, mtime_ns=mtime_ns, indexed_at=now_iso(), filename=None)
                event = ImageEvent(path, "copy", known.n_segments, reason=f"same content as {known.path}")
                return Write(event, drop=old is not None, entry=entry, copy_of=sha, kept=True)
            self._release(sha)
        self.by_sha[sha] = path
        return None

    def failed(self, path: str, reason: str, old: ImageEntry | None, warnings: list[str] | None = None,
               sha: str | None = None) -> ImageEvent | Write:
        """A file that cannot be indexed: its outdated record and reference go, if it had one."""
        if sha is not None:
            with self.lock:
                self.failures.setdefault(sha, reason)
        event = ImageEvent(path, "failed", reason=reason, warnings=warnings or [])
        return Write(event, drop=True) if old is not None else event

    def committed(self, w: Write) -> None:
        if w.entry is not None and self.by_sha.get(w.entry.sha256) == w.event.path:
            del self.by_sha[w.entry.sha256]
        if w.kept and w.copy_of is not None:
            self._release(w.copy_of)

    def collect(self) -> int:
        """After the run: delete the points of contents kept for copies that no path refers to in the end."""
        return self.store.delete_contents([sha for sha in self.kept if self.store.content_paths(sha) == []])

    def _release(self, sha: str) -> None:
        with self.lock:
            self.keep[sha] -= 1
            if self.keep[sha] <= 0:
                del self.keep[sha]

    def _complete(self, sha: str, n_segments: int) -> bool:
        return self.store.count_segments(SearchFilter(sha256=sha)) == n_segments

    def _known(self, sha: str) -> ImageEntry | None:
        """A record of this content whose points are all there (under whatever path, present or gone)."""
        records = self.store.find_images(sha)
        if not records:
            return None
        n = self.store.count_segments(SearchFilter(sha256=sha))
        return next((e for e in records if e.n_segments == n), None)


def check_model(store: VectorStore, model: str) -> None:
    """Refuse to mix vector spaces in one collection: its first record must be embedded with ``model``."""
    for entry in store.iter_images():
        if entry.model != model:
            raise StoreError(
                f"this collection holds segments embedded with '{entry.model}', but this run embeds "
                f"with '{model}'. Use another collection (--collection), or --force "
                "to re-embed every image with the new model."
            )
        return


Emit = Callable[[ImageEvent], None]


class Runner:
    """The run every runner shares (``Indexer``, the Ray runner): ``index`` plans with one ``Planner``,
    reports each event, then deletes the contents kept for copies that no path refers to, and prunes.
    A runner supplies ``_run`` (list, plan, index and commit the files under ``root``) and may wrap the
    run in ``_session`` (what it sets up and tears down; the run's time includes it)."""

    store: VectorStore

    def index(
        self,
        root: Path,
        *,
        prune: bool = False,
        force: bool = False,
        verify: bool = False,
        on_image: Emit | None = None,
        on_total: Callable[[int], None] | None = None,
    ) -> IndexReport:
        """Index the images under ``root``. ``verify``: hash every file even when its size and mtime match
        its record; ``force``: re-index every file; ``prune``: then drop the references of files under
        ``root`` that are gone (``root`` itself may be gone). ``on_total`` gets the number of files found,
        ``on_image`` one event per file (and per folder that cannot be listed), on the calling thread."""
        started = time.perf_counter()
        report = IndexReport()
        planner = Planner(self.store, force=force, verify=verify)

        def emit(event: ImageEvent) -> None:
            report.add(event)
            if on_image:
                on_image(event)

        with self._session(force):
            try:
                if Path(root).exists() or not prune:  # a folder that is gone: only its prune
                    self._run(Path(root), planner, emit, report, on_total)
                    report.pruned_segments += planner.collect()
                if prune:
                    pruned = prune_store(self.store, root)
                    report.pruned_images, report.pruned_orphans = len(pruned.records), len(pruned.orphans)
                    report.pruned_segments += pruned.segments
            finally:
                report.seconds = time.perf_counter() - started
        return report

    @contextmanager
    def _session(self, force: bool) -> Iterator[None]:
        yield

    def _run(
        self, root: Path, planner: Planner, emit: Emit, report: IndexReport, on_total: Callable[[int], None] | None
    ) -> None:
        raise NotImplementedError


def commit(store: VectorStore, writes: Sequence[Write], keep: Collection[str] = (),
           failures: Mapping[str, str] | None = None) -> None:
    """Apply one batch with the write order of ``store/base.py``, one write per step: old records and
    references out, new points in (listing their path), their records, then the copies' references and
    records. A copy of content whose indexing failed in this run fails too (``failures``: content → reason)."""
    drops = [w.event.path for w in writes if w.drop]
    store.delete_images(drops, keep)
    fresh = {w.event.path: w.copy_of or w.points[0].payload["sha256"] for w in writes if not w.drop and (w.points or w.copy_of)}
    if fresh:  # a new reference: clear what an interrupted run left for this path
        store.clear_references(fresh, keep)
    points = [p for w in writes for p in _with_other_paths(store, w)]
    if points:
        store.upsert_segments(points)
    entries = [w.entry for w in writes if w.entry is not None and w.copy_of is None]
    if entries:
        store.put_images(entries)
    copies = []
    for w in writes:
        if w.copy_of is None:
            continue
        entry = w.entry or _copy_entry(store, w)
        if entry is None:
            why = (failures or {}).get(w.copy_of, "it could not be indexed")
            w.event = ImageEvent(w.event.path, "failed", reason=f"same content as {w.first}, which failed: {why}")
            continue
        w.entry = entry
        w.event.segments = entry.n_segments
        copies.append(entry)
    if copies:
        store.add_references([(e.path, e.sha256) for e in copies])
        store.put_images(copies)


def batch_full(pending: Sequence[Write], batch_images: int) -> bool:
    """A commit's worth: ``batch_images`` images with new points, or many writes without (copies and
    refreshed records cost one write per batch, not per file)."""
    return sum(1 for w in pending if w.points) >= batch_images or len(pending) >= MAX_WRITES_PER_COMMIT


def _with_other_paths(store: VectorStore, w: Write) -> list[SegmentPoint]:
    """New points of a content that other recorded paths already refer to (re-embedded with ``--force``)
    keep those references."""
    if not w.points:
        return []
    sha = w.points[0].payload["sha256"]
    others = [
        p for p in store.content_paths(sha) or []
        if p != w.event.path and (e := store.get_image(p)) is not None and e.sha256 == sha
    ]
    if not others:
        return w.points
    fields = references([w.event.path, *others])
    return [SegmentPoint(p.id, p.vector, {**p.payload, **fields}) for p in w.points]


def _copy_entry(store: VectorStore, w: Write) -> ImageEntry | None:
    """The record of a copy of content indexed earlier in this run, from that content's record."""
    done = next(iter(store.find_images(w.copy_of or "")), None)
    if done is None:
        return None
    size, mtime = w.stat or (None, None)
    return replace(done, path=w.event.path, size=size, mtime_ns=mtime, indexed_at=now_iso(), filename=None)
