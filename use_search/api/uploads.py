"""Indexing an uploaded image, and undoing what a killed server left half-written.

An upload is written as ``<sha256>.<ext>.<nonce>.part``, then its segments and record, then renamed
into place: a ``.part`` still there means that request never finished."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from use_search.api.state import AppState
from use_search.api.worker import Indexed
from use_search.imaging import probe
from use_search.indexer.read import sha256_bytes
from use_search.indexer.runner import now_iso
from use_search.store.base import ImageEntry, VectorStore, image_id

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp", "MPO": "jpg"}


def complete_upload(store: VectorStore, dest: Path, digest: str) -> ImageEntry | None:
    """The record of an upload that is fully indexed: record with this content, file in place."""
    entry = store.get_image(str(dest)) if store.dim is not None else None
    return entry if entry is not None and entry.sha256 == digest and dest.is_file() else None


def repair_uploads(store: VectorStore, uploads: Path) -> list[str]:
    """Undo uploads a killed server left half-written: whatever a ``.part`` file's request wrote goes
    (unless the same image was completed by another request). Returns the upload paths undone."""
    undone = []
    for part in sorted(uploads.glob("*.part")) if uploads.is_dir() else []:
        digest, ext = part.name.split(".")[:2]
        dest = uploads / f"{digest}.{ext}"
        if drop_unfinished(store, dest, digest):
            undone.append(str(dest))
        part.unlink(missing_ok=True)
    return undone


def drop_unfinished(store: VectorStore, dest: Path, digest: str) -> bool:
    """Delete what an upload to ``dest`` wrote, unless the upload is complete (another request of the
    same image may have finished it). True when it was unfinished."""
    if complete_upload(store, dest, digest) is not None:
        return False
    if store.dim is not None:
        store.delete_image(str(dest))
    return True


def undo_upload(st: AppState, dest: Path, digest: str, tmp: Path) -> None:
    """Drop what a failed upload wrote (unless another request completed the same image). When the store
    cannot be written (closing, failing), the .part file stays and the next start undoes it."""
    try:
        with st.store_lock:
            drop_unfinished(st.require_store(), dest, digest)
        tmp.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - the request's own error is the one to report
        pass


def exists(body: dict[str, Any], old: ImageEntry) -> dict[str, Any]:
    return {**body, "filename": old.filename, "width": old.width, "height": old.height, "status": "exists",
            "n_segments": old.n_segments}


def index_upload(st: AppState, uploads: Path, data: bytes, filename: str | None) -> dict[str, Any]:
    """Index an uploaded image (in the worker) and keep its file under ``uploads``; the body of the
    answer, ``status`` "indexed" or "exists"."""
    info = probe(data, st.settings.api.max_pixels)  # not an image / too many pixels: refused before any work
    digest = sha256_bytes(data)
    dest = uploads / f"{digest}.{FORMAT_EXT.get(info.format, info.format.lower())}"
    body = {"id": image_id(str(dest)), "path": str(dest), "sha256": digest, "filename": filename,
            "width": info.width, "height": info.height}
    with st.store_lock:
        store = st.require_store()
        old = complete_upload(store, dest, digest)
        twins = [e for e in store.find_images(digest) if e.path != str(dest)] if store.dim is not None else []
        someone = next(store.iter_images(), None) if store.dim is not None else None
    if old is not None:
        return exists(body, old)
    twin = next((e for e in twins if Path(e.path).is_file()), None)
    if twin is not None:  # point ids come from the content hash: indexing it again would steal its points
        raise HTTPException(409, f"the same image is already indexed as {twin.path} (id {image_id(twin.path)})")
    done: Indexed = st.worker.run("index", data, str(dest), digest)
    if someone is not None and someone.model != done.model:
        raise HTTPException(
            409, f"this store holds segments embedded with '{someone.model}', the server embeds with "
            f"'{done.model}': serve with the same preset/--model as for indexing"
        )
    return commit_upload(st, dest, digest, data, done, body, filename)


def commit_upload(st: AppState, dest: Path, digest: str, data: bytes, done: Indexed, body: dict[str, Any],
                  filename: str | None) -> dict[str, Any]:
    """Write an indexed upload. The file goes in place last, after the points and the record: a .part file
    left behind says the request never finished (``repair_uploads``). One .part per request: the same
    image may be uploaded twice at once, and the first to get here indexes it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        tmp.write_bytes(data)
        written = tmp.stat()
        with st.store_lock:
            store = st.require_store()
            old = complete_upload(store, dest, digest)
            if old is not None:
                tmp.unlink()
                return exists(body, old)
            store.ensure(done.dim)
            if done.points:
                store.upsert_segments(done.points)
            store.put_image(ImageEntry(str(dest), digest, done.width, done.height, len(done.points), done.model,
                                       now_iso(), filename=filename, size=written.st_size, mtime_ns=written.st_mtime_ns))
            os.replace(tmp, dest)
    except BaseException:
        undo_upload(st, dest, digest, tmp)
        raise
    return {**body, "width": done.width, "height": done.height, "status": "indexed", "n_segments": len(done.points)}
