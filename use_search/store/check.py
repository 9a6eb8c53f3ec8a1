"""``store check``: read every point of a store without trusting it, and say what is wrong.

A point is sound when the engine can read it, its vector is finite and of unit norm (cosine
collections store vectors normalised), its payload has every field ``segment_payload`` writes, its
RLE decodes to a mask of the image's size whose box and area are the stored ones, and its id is the
one its content hash and segment index give, and its ``dirs`` are the folders of its ``paths``. Records
and points agree when every content a record names has exactly the points its hash and segment count
give, every point belongs to such a content, and its ``paths`` are exactly the paths of that content's
records. ``repair``
then drops the damaged points and re-indexes exactly the images they belong to (a damaged, missing
or unclaimed point) whose file is still there.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from use_search.store.base import ImageEntry, StoreDamagedError, StoredPoint, VectorStore, references
from use_search.types import point_id

READ_CHUNK = 256
FLOAT32_EPS = float(np.finfo(np.float32).eps)
PAYLOAD_FIELDS = ("paths", "dirs", "sha256", "width", "height", "segment_index", "n_segments", "rle", "bbox", "area", "model")


def norm_tolerance(dim: int) -> float:
    """How far from 1 the norm of a float32 vector normalised in float32 can be: the engine's sum of
    ``dim`` squares carries up to ``dim`` roundings of u = eps/2, the division and the stored rounding a
    few more per component; ``(dim + 4) · eps`` is twice that bound."""
    return (dim + 4) * FLOAT32_EPS


@dataclass(frozen=True)
class Problem:
    kind: str  # unreadable | vector | payload | missing | orphan | records
    detail: str
    point_id: str | None = None
    path: str | None = None  # the image it belongs to, where known

    def line(self) -> str:
        where = " ".join(x for x in (self.path or "", f"point {self.point_id}" if self.point_id else "") if x)
        return f"{self.kind}: {where + ': ' if where else ''}{self.detail}"


@dataclass
class CheckReport:
    images: int = 0
    points: int = 0
    problems: list[Problem] = field(default_factory=list)
    copies: dict[str, list[str]] = field(default_factory=dict)  # path → every path of its content

    @property
    def ok(self) -> bool:
        return not self.problems

    def damaged_paths(self) -> list[str]:
        """Images with a damaged or missing point, or with points but no record, and every other path
        of their content (they share its points): what ``repair`` re-indexes (where the file is still there)."""
        return sorted({c for p in self.problems if p.path for c in self.copies.get(p.path, [p.path])})

    def damaged_ids(self) -> list[str]:
        return sorted({p.point_id for p in self.problems if p.point_id and p.kind != "missing"})


def point_problems(p: StoredPoint, dim: int | None) -> list[str]:
    """What is wrong with one point read from the store (empty: sound)."""
    from use_search.masks import rle_area, rle_bbox  # pycocotools: only when checking

    out = []
    v = p.vector.astype(np.float64).ravel()
    if dim is not None and v.size != dim:
        out.append(f"vector has {v.size} values, the collection {dim}")
    if not np.all(np.isfinite(v)):
        out.append("vector has non-finite values")
    else:
        norm = float(np.linalg.norm(v))
        if abs(norm - 1.0) > norm_tolerance(v.size):
            out.append(f"vector norm is {norm:.6g}, not 1 (tolerance {norm_tolerance(v.size):.1e})")
    pl = p.payload or {}
    missing = [k for k in PAYLOAD_FIELDS if k not in pl]
    if missing:
        return out + [f"payload lacks {', '.join(missing)}"]
    try:
        rle = pl["rle"]
        size = [int(x) for x in rle["size"]]
        if size != [int(pl["height"]), int(pl["width"])]:
            out.append(f"mask size {size} is not the image's {[pl['height'], pl['width']]}")
        area, bbox = rle_area(rle), rle_bbox(rle)
        if area != int(pl["area"]):
            out.append(f"area {pl['area']} but the mask has {area} pixels")
        if list(bbox) != [int(x) for x in pl["bbox"]]:
            out.append(f"bbox {pl['bbox']} but the mask's is {list(bbox)}")
        if references(str(x) for x in pl["paths"])["dirs"] != list(pl["dirs"]):
            out.append("dirs are not the folders of its paths")
        if point_id(pl["sha256"], int(pl["segment_index"])) != p.id:
            out.append("id is not the one its sha256 and segment_index give")
    except Exception as e:  # any malformed field: pycocotools, int(), keys
        out.append(f"payload does not decode: {type(e).__name__}: {e}")
    return out


def owned_points(records: Iterable[ImageEntry]) -> dict[str, tuple[str, int, int]]:
    """The data model in one place: a content's points are the ids of its hash and segment count,
    whichever of its paths' records names them. Point id → (content hash, segment index, segment count)."""
    return {point_id(r.sha256, i): (r.sha256, i, r.n_segments) for r in records for i in range(r.n_segments)}


def reconcile(records: Iterable[ImageEntry], points: dict[str, list[str] | None]) -> list[Problem]:
    """Records against points. ``points``: id → the paths its payload lists (None where unreadable).
    Every point a content's records name must be there, every point must belong to a content some
    record names (else an interrupted run left it: an orphan), and list exactly the paths whose records
    have its content."""
    records = list(records)
    paths_of: dict[str, set[str]] = defaultdict(set)
    for r in records:
        paths_of[r.sha256].add(r.path)
    owned = owned_points(records)
    problems = [
        Problem("missing", f"segment {i} of {n} is not in the store", pid, min(paths_of[sha]))
        for pid, (sha, i, n) in owned.items() if pid not in points
    ]
    for pid, listed in points.items():
        if pid not in owned:
            problems.append(Problem("orphan", "no image record claims this point", pid, min(listed) if listed else None))
            continue
        expected = paths_of[owned[pid][0]]
        if listed is not None and set(listed) != expected:
            problems.append(Problem("payload", f"payload lists {sorted(listed)}, the records {sorted(expected)}",
                                    pid, min(expected)))
    return problems


def check_store(store: VectorStore) -> CheckReport:
    report = CheckReport()
    try:
        records = list(store.iter_images())
    except StoreDamagedError as e:
        records = []
        report.problems.append(Problem("records", f"image records cannot be read: {e}"))
    report.images = len(records)
    by_content: dict[str, list[str]] = defaultdict(list)
    for r in records:
        by_content[r.sha256].append(r.path)
    report.copies = {r.path: sorted(by_content[r.sha256]) for r in records}
    owner = {pid: min(by_content[sha]) for pid, (sha, _, _) in owned_points(records).items()}
    ids = list(store.point_ids())
    report.points = len(ids)
    listed: dict[str, list[str] | None] = {}
    for start in range(0, len(ids), READ_CHUNK):
        chunk = ids[start : start + READ_CHUNK]
        for pid, got in _read(store, chunk):
            if isinstance(got, str):
                listed[pid] = None
                report.problems.append(Problem("unreadable", got, pid, owner.get(pid)))
                continue
            paths = got.payload.get("paths") if isinstance(got.payload, dict) else None
            listed[pid] = [str(x) for x in paths] if isinstance(paths, list) else None
            for detail in point_problems(got, store.dim):
                kind = "vector" if detail.startswith("vector") else "payload"
                report.problems.append(Problem(kind, detail, pid, owner.get(pid, min(listed[pid] or [""]) or None)))
    report.problems.extend(reconcile(records, listed))
    return report


def _read(store: VectorStore, ids: Sequence[str]) -> list[tuple[str, StoredPoint | str]]:
    """Each id with its point, or the engine's error: the chunk at once, point by point if it fails."""
    try:
        found = {p.id: p for p in store.read_points(ids)}
        return [(i, found[i]) for i in ids if i in found]
    except StoreDamagedError:
        out: list[tuple[str, StoredPoint | str]] = []
        for i in ids:
            try:
                out.extend((i, p) for p in store.read_points([i]))
            except StoreDamagedError as e:
                out.append((i, e.detail or str(e)))
        return out


@dataclass
class RepairReport:
    dropped_points: int = 0
    reindexed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # damaged images whose file no longer exists: dropped


def repair(store: VectorStore, report: CheckReport, reindex: Callable[[list[Path]], Any]) -> RepairReport:
    """Drop every damaged point and the records and points of the damaged images, then ``reindex`` those
    images' files (the indexer, which writes them as a first index would). Images whose file is gone
    stay dropped."""
    out = RepairReport()
    ids = report.damaged_ids()
    store.delete_segments(ids)
    out.dropped_points = len(ids)
    paths = report.damaged_paths()
    for path in paths:
        store.delete_image(path)
    out.reindexed = [p for p in paths if Path(p).is_file()]
    out.gone = [p for p in paths if not Path(p).is_file()]
    if out.reindexed:
        reindex([Path(p) for p in out.reindexed])
    return out


def group_by_kind(problems: Sequence[Problem]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for p in problems:
        counts[p.kind] += 1
    return dict(counts)
