"""Vector stores: ``EdgeStore`` (embedded, qdrant-edge) and ``ServerStore`` (Qdrant server)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from use_search.config import Settings
from use_search.store.base import (
    ImageEntry,
    SearchFilter,
    StoreDamagedError,
    StoreError,
    StoreFullError,
    VectorStore,
    segment_payload,
)

if TYPE_CHECKING:
    from use_search.store.edge import EdgeStore
    from use_search.store.server import ServerStore

__all__ = [
    "VectorStore",
    "EdgeStore",
    "ServerStore",
    "ImageEntry",
    "SearchFilter",
    "StoreError",
    "StoreFullError",
    "StoreDamagedError",
    "segment_payload",
    "open_store",
]


def __getattr__(name: str) -> Any:
    # Each backend imports its engine's client (qdrant-edge, qdrant-client: ~0.8 s) only when used.
    if name == "EdgeStore":
        from use_search.store.edge import EdgeStore

        return EdgeStore
    if name == "ServerStore":
        from use_search.store.server import ServerStore

        return ServerStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(settings: Settings, *, writable: bool = True) -> VectorStore:
    """The store the settings name: the embedded one at ``settings.store_path`` or a Qdrant server.
    ``writable=False`` for commands that only read (no free space needed, read-only folders work).
    A store an older version wrote is migrated to content-addressed segments (``VectorStore.migrate``)
    when opened writable; a reader asks for that first."""
    opened = _open(settings, writable=writable)
    try:
        if writable:
            opened.migrate()
        elif opened.needs_migration():
            raise StoreError(
                f"the store at {settings.store_path} was written by an older use-search (one path per segment): "
                "open it once with a command that writes (e.g. `use-search index FOLDER`) to migrate it"
            )
    except BaseException:
        opened.close()
        raise
    return opened


def _open(settings: Settings, *, writable: bool) -> VectorStore:
    from use_search.store.layout import SearchTuning, requested

    store = settings.store
    tuning = SearchTuning(rescore=store.rescore, oversampling=store.oversampling)
    if store.backend == "embedded":
        from use_search.store.edge import EdgeStore

        return EdgeStore(
            settings.store_path, store.collection, writable=writable, min_free_bytes=store.min_free_mb * 1024 * 1024,
            max_segment_mb=store.max_segment_mb, indexing_threshold_kb=store.indexing_threshold_kb,
            layout=requested(store), tuning=tuning,
        )
    if not store.url:
        raise StoreError("store.backend is 'server' but store.url is not set (e.g. USE_SEARCH_STORE__URL)")
    from use_search.store.server import ServerStore

    server = ServerStore.connect(
        store.url, store.collection, api_key=store.api_key, timeout_s=store.timeout_s,
        shard_number=store.shard_number, replication_factor=store.replication_factor,
        write_consistency_factor=store.write_consistency_factor, layout=requested(store), tuning=tuning,
    )
    try:
        server.layout  # noqa: B018  (a collection created with other settings than asked: StoreError now)
    except BaseException:
        server.close()
        raise
    return server
