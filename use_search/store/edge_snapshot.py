"""Restoring an embedded store from the archive ``EdgeStore.snapshot`` writes."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from use_search.store import layout as lay
from use_search.store.base import StoreError
from use_search.store.edge import EdgeStore
from use_search.store.edge_files import IMAGES_DIR, SEGMENTS_DIR, SNAPSHOT_FORMAT, SNAPSHOT_MANIFEST, shard_exists
from use_search.store.layout import Layout


def restore_snapshot(archive: Path, path: Path, collection: str) -> dict[str, Any]:
    """Unpack a ``snapshot`` into ``path/collection``, which must hold no store yet; returns its manifest.
    Each shard's files go to a plain tar next to the store (the format the engine reads), which the
    engine's ``unpack_snapshot`` unpacks; the restored store is then opened and its counts checked."""
    root = Path(path) / collection
    if any(shard_exists(root / name) for name in (SEGMENTS_DIR, IMAGES_DIR)):
        raise StoreError(f"{root} already holds a store: restore into a new folder (--store DIR) or --collection")
    try:
        outer = tarfile.open(archive, "r:gz")
    except (OSError, tarfile.TarError) as e:
        raise StoreError(f"{archive} is not a use-search snapshot: {e}") from None
    root.mkdir(parents=True, exist_ok=True)
    parts = {name: root / f".{name}.restore.tar" for name in (SEGMENTS_DIR, IMAGES_DIR)}
    try:
        with outer:
            manifest = read_manifest(outer, archive)
            inner = {name: tarfile.open(tmp, "w") for name, tmp in parts.items()}
            try:
                for member in outer:
                    shard, _, rest = member.name.partition("/")
                    safe = rest and not rest.startswith("/") and ".." not in Path(rest).parts
                    if shard in inner and safe and not member.issym() and not member.islnk():
                        member.name = rest
                        inner[shard].addfile(member, outer.extractfile(member) if member.isfile() else None)
            finally:
                for t in inner.values():
                    t.close()
        if manifest.get("layout"):
            lay.write_recorded(root, Layout(**manifest["layout"]))
        for name, tmp in parts.items():
            try:
                qe.EdgeShard.unpack_snapshot(str(tmp), str(root / name))
            except Exception as e:
                raise StoreError(f"cannot restore {name} from {archive}: {e}") from None
    finally:
        for tmp in parts.values():
            tmp.unlink(missing_ok=True)
    with EdgeStore(path, collection, min_free_bytes=0) as store:
        got = {"dim": store.dim, "points": store.count_segments(), "images": store.count_images()}
    want = {k: manifest.get(k) for k in got}
    if got != want:
        raise StoreError(f"the store restored from {archive} holds {got}, its snapshot says {want}")
    return manifest


def read_manifest(tar: tarfile.TarFile, archive: Path) -> dict[str, Any]:
    first = tar.next()
    reader = tar.extractfile(first) if first is not None and first.name == SNAPSHOT_MANIFEST else None
    manifest = json.loads(reader.read()) if reader is not None else {}
    if manifest.get("format") != SNAPSHOT_FORMAT:
        raise StoreError(f"{archive} is not a use-search snapshot (no {SNAPSHOT_MANIFEST} first)")
    return manifest
