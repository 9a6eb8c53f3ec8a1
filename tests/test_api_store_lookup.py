"""``VectorStore.get_image_by_id``: the API's image lookup is one retrieve on both backends, and an
upload's original file name round-trips through the image record."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from qdrant_client import QdrantClient

from use_search.store.base import ImageEntry, VectorStore, image_id
from use_search.store.edge import EdgeStore
from use_search.store.server import ServerStore


@pytest.fixture(params=["edge", "server-memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    s: VectorStore = (
        EdgeStore(tmp_path / "store", "segments") if request.param == "edge"
        else ServerStore(QdrantClient(":memory:"), "segments")
    )
    yield s
    s.close()


def test_get_image_by_id(store: VectorStore) -> None:
    assert store.get_image_by_id(str(uuid.uuid4())) is None  # before the collections exist
    store.ensure(4)
    plain = ImageEntry("/photos/a.jpg", "a" * 64, 10, 20, 3, "m1", "2024-01-01T00:00:00+00:00")
    upload = ImageEntry("/data/uploads/" + "b" * 64 + ".png", "b" * 64, 5, 6, 1, "m1", "2024-01-01T00:00:00+00:00",
                        filename="holiday photo.png")
    for e in (plain, upload):
        store.put_image(e)
    assert store.get_image_by_id(image_id(plain.path)) == plain
    assert store.get_image_by_id(image_id(upload.path)) == upload
    assert store.get_image_by_id(image_id(upload.path)).filename == "holiday photo.png"
    assert store.get_image(plain.path).filename is None
    assert "filename" not in plain.payload()  # records of indexed files keep their payload shape
    assert store.get_image_by_id(str(uuid.uuid4())) is None
