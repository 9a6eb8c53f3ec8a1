"""Qdrant cluster options: settings (env too) → ServerStore → create_collection."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from qdrant_client import QdrantClient

from use_search.config import Settings, StoreSettings
from use_search.store import ServerStore

OPTIONS = ("shard_number", "replication_factor", "write_consistency_factor")


def recording_client() -> tuple[QdrantClient, list]:
    client = QdrantClient(":memory:")  # local mode accepts and ignores the cluster options
    calls: list = []
    create = client.create_collection

    def record(name, **kw):  # type: ignore[no-untyped-def]
        calls.append((name, {k: kw[k] for k in OPTIONS if k in kw}))
        return create(name, **kw)

    client.create_collection = record  # type: ignore[method-assign]
    return client, calls


def test_collections_are_created_with_the_cluster_options():
    client, calls = recording_client()
    store = ServerStore(client, "segments", shard_number=6, replication_factor=2, write_consistency_factor=1)
    store.ensure(8)
    store.ensure(8)  # existing collections are left as they are
    assert calls == [
        ("segments", {"shard_number": 6, "replication_factor": 2, "write_consistency_factor": 1}),
        ("segments_images", {"shard_number": 1, "replication_factor": 2, "write_consistency_factor": 1}),
    ]


def test_no_options_means_server_defaults():
    client, calls = recording_client()
    ServerStore(client, "segments").ensure(8)
    assert calls == [("segments", {}), ("segments_images", {})]


def test_settings_from_env_and_validation(monkeypatch):
    monkeypatch.setenv("USE_SEARCH_STORE__SHARD_NUMBER", "6")
    monkeypatch.setenv("USE_SEARCH_STORE__REPLICATION_FACTOR", "2")
    monkeypatch.setenv("USE_SEARCH_STORE__WRITE_CONSISTENCY_FACTOR", "2")
    store = Settings().store
    assert (store.shard_number, store.replication_factor, store.write_consistency_factor) == (6, 2, 2)
    with pytest.raises(ValidationError, match="exceeds"):
        StoreSettings(replication_factor=2, write_consistency_factor=3)
    with pytest.raises(ValidationError):
        StoreSettings(shard_number=0)
