"""What the routes work with, handed to them as FastAPI dependencies (``Depends``): the server's fixed
configuration (``AppConfig``, built with the app) and the open resources (``AppState``: the store, the
query embedder, the worker, the drawing slots; built in the app's lifespan)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from prometheus_client import CollectorRegistry, Gauge

from use_search.api.guard import Metrics
from use_search.api.worker import HeavyWorker
from use_search.config import Settings
from use_search.indexer.read import ImageReadError, max_file_bytes, read_file, sha256_bytes, stat_file
from use_search.store.base import ImageEntry, StoreError, VectorStore
from use_search.types import Hit


@dataclass
class AppConfig:
    """The server's configuration and metrics, fixed when the app is built."""

    settings: Settings
    key: str | None  # the API key, None when the server has none
    upload_limit: int  # bytes of one uploaded image
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.http = Metrics(r)
        self.images = Gauge("use_search_images", "Indexed images in the store", registry=r)
        self.segments = Gauge("use_search_segments", "Segments in the store", registry=r)
        self.jobs = Gauge("use_search_worker_jobs", "Heavy jobs running or waiting", registry=r)

    @property
    def uploads(self) -> Path:
        return self.settings.data_dir / "uploads"


class AppState:
    def __init__(self, settings: Settings) -> None:
        from use_search.factory import Runtime

        self.settings = settings
        self.runtime = Runtime.from_settings(settings)
        self.store: VectorStore | None = None
        self.read_only = False  # the store is in a folder this process cannot write: search only
        self.store_lock = threading.RLock()  # held for single store calls only
        self.text_lock = threading.Lock()  # the text tower (search's fast path)
        # PNGs drawn at once (overlays, masks): a full-size mask is 49 MB at 7000×7000. Waiters wait in
        # the event loop, not in the thread pool that every sync route (search too) runs in.
        self.render_slots = asyncio.Semaphore(2)
        self.worker = HeavyWorker(settings)  # SAM + image embedder, in a child process
        self._build_lock = threading.Lock()
        self._searcher = None

    def searcher(self):  # type: ignore[no-untyped-def]
        with self._build_lock:
            if self._searcher is None:
                from use_search.query.search import Searcher

                # CLIP's text tower alone: the image side lives in the worker process.
                self._searcher = Searcher(self.require_store(), self.runtime.query_embedder())
            return self._searcher

    def require_store(self) -> VectorStore:
        if self.store is None:
            raise StoreError("the store is not open")
        return self.store

    def require_writable(self) -> None:
        """503 when the store is read-only: a route that writes it refuses before any work."""
        if self.read_only:
            raise HTTPException(
                503, f"the store at {self.settings.store_path} is read-only for this server (it cannot write "
                "that folder): search, lookups and /segment work, uploads need a store it can write",
            )

    def image_entry(self, img_id: uuid.UUID) -> ImageEntry:
        with self.store_lock:
            store = self.require_store()
            entry = store.get_image_by_id(str(img_id)) if store.dim is not None else None
        if entry is None:
            raise HTTPException(404, f"no indexed image with id {img_id}")
        return entry

    def segment(self, seg_id: uuid.UUID) -> Hit:
        with self.store_lock:
            store = self.require_store()
            found = store.get_segments([str(seg_id)]) if store.dim is not None else []
        if not found:
            raise HTTPException(404, f"no segment with id {seg_id}")
        return found[0]

    def filenames(self, paths: set[str]) -> dict[str, str]:
        """Display names: an upload's original file name from its image record, else the file's name."""
        uploads = self.settings.data_dir / "uploads"
        names = {p: PurePosixPath(p).name for p in paths}
        for p in paths:
            if Path(p).parent == uploads:
                with self.store_lock:
                    entry = self.require_store().get_image(p)
                if entry is not None and entry.filename:
                    names[p] = entry.filename
        return names

    def stored_bytes(self, entry: ImageEntry) -> bytes:
        """An indexed image's file, as it was indexed (else 409 changed / 410 unreadable)."""
        changed = HTTPException(409, f"{entry.path} changed since it was indexed; reindex it")
        try:  # a regular file only: a FIFO put in its place would block the read forever, /dev/zero never end
            if entry.size is not None and stat_file(Path(entry.path)).st_size != entry.size:
                raise changed
            data, _ = read_file(Path(entry.path), max_file_bytes(self.settings.max_image_pixels))
        except ImageReadError as e:
            raise HTTPException(410, f"indexed image {entry.path} cannot be read any more: {e}") from None
        if sha256_bytes(data) != entry.sha256:
            raise changed
        return data


# The dependencies. ``async``: reading an attribute needs no trip through the thread pool.
async def app_state(request: Request) -> AppState:
    return request.app.state.use


async def app_config(request: Request) -> AppConfig:
    return request.app.state.config


State = Annotated[AppState, Depends(app_state)]
Config = Annotated[AppConfig, Depends(app_config)]
