"""Prune: drop the references of files that no longer exist (moved, renamed, deleted), store-wide or
under one folder. A content's points go with its last reference (``VectorStore.delete_image``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from use_search.store.base import SearchFilter, VectorStore


@dataclass
class Pruned:
    records: list[str] = field(default_factory=list)  # indexed paths whose file is gone
    orphans: list[str] = field(default_factory=list)  # paths segments refer to with neither a record nor a file
    segments: int = 0  # segment points deleted (contents no path refers to any more)


def prune_store(store: VectorStore, root: Path | None = None, *, dry_run: bool = False) -> Pruned:
    """Drop every reference under ``root`` (the whole store when None) whose file does not exist:
    image records, and references an interrupted run left without a record. ``root`` itself may be
    gone. ``dry_run``: only list them."""
    out = Pruned()
    if store.dim is None:
        return out
    under = None if root is None else str(Path(root).absolute())

    def inside(path: str) -> bool:
        return under is None or path == under or path.startswith(under.rstrip("/") + "/")

    out.records = sorted(e.path for e in store.iter_images() if inside(e.path) and not Path(e.path).exists())
    if under is None:
        referenced = list(store.segment_paths())
    else:
        referenced = [*store.segment_paths(SearchFilter(under=under)), *store.segment_paths(SearchFilter(path=under))]
    gone = set(out.records)
    out.orphans = sorted(
        p for p in set(referenced)
        if p not in gone and not Path(p).exists() and store.get_image(p) is None
    )
    if not dry_run:
        out.segments = store.delete_images([*out.records, *out.orphans])
    return out
