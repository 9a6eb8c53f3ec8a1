"""Store settings at scale (store/layout.py, store/build.py): each quantization round-trips on every
backend, a store opened with settings other than its own says so, searches without masks keep box and
area, and the embedded store's segments keep their size cap whatever the batch size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_store_contract import DIM, IMAGES, QDRANT_URL, cosine_ranking, entry, make_point, make_points, open_backend  # noqa: F401

from use_search.config import Settings, StoreSettings
from use_search.store import EdgeStore, StoreError, open_store
from use_search.store.build import points_per_segment
from use_search.store.layout import LAYOUT_FILE, QUANTIZATIONS, Layout

pytestmark = pytest.mark.filterwarnings(
    "ignore:Payload indexes have no effect:UserWarning", "ignore:Local mode performs exact:UserWarning"
)
# Scores are float32 cosines of unit vectors (rescored with the float vectors): a few float32 ulps.
SCORE_TOL = 8 * np.finfo(np.float32).eps * DIM


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_each_quantization_round_trips(open_backend, quantization: str) -> None:
    store = open_backend({"quantization": quantization})
    store.ensure(DIM)
    points = make_points()
    store.upsert_segments(points)
    store.optimize()
    assert store.layout == Layout(quantization=quantization)
    for p in points:
        expected = cosine_ranking(points, p.vector)
        hits = store.search(p.vector, k=3)
        assert [h.id for h in hits] == [i for i, _ in expected[:3]]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected[:3]], atol=SCORE_TOL)
        assert hits[0].rle == p.payload["rle"] and hits[0].bbox == tuple(p.payload["bbox"])
    again = open_backend()  # no settings asked: the store's own
    assert again.layout == Layout(quantization=quantization)
    assert again.search(points[3].vector, k=1)[0].id == points[3].id


@pytest.mark.parametrize("asked", [{"quantization": "none"}, {"vectors_on_disk": False}, {"payload_on_disk": False}])
def test_a_store_opened_with_other_settings_says_which(open_backend, asked: dict) -> None:
    store = open_backend({"quantization": "int8"})
    store.ensure(DIM)
    store.upsert_segments(make_points())
    (key, value), = asked.items()
    own = {"quantization": "int8", "vectors_on_disk": True, "payload_on_disk": True}[key]
    with pytest.raises(StoreError, match=rf"created with other store settings \(store\.{key} = {own} in the store, {value} asked\)"):
        other = open_backend(asked)
        other.ensure(DIM)  # a server collection is checked on open (open_store) or here
    assert open_backend({"quantization": "int8"}).count_segments() == len(make_points())


def test_open_store_refuses_other_settings_with_the_message(tmp_path: Path) -> None:
    def settings(**kw) -> Settings:
        return Settings(data_dir=tmp_path, store=StoreSettings(path=tmp_path / "store", **kw))

    with open_store(settings(quantization="binary")) as store:
        store.ensure(DIM)
    assert json.loads((tmp_path / "store" / "segments" / LAYOUT_FILE).read_text())["quantization"] == "binary"
    with pytest.raises(StoreError, match=r"store\.quantization = binary in the store, turbo4 asked"):
        open_store(settings(quantization="turbo4"))
    with open_store(settings(), writable=False) as store:
        assert store.layout == Layout(quantization="binary")


def test_a_store_from_before_layouts_reads_as_floats_in_ram(tmp_path: Path) -> None:
    with EdgeStore(tmp_path, "segments", layout={"quantization": "none", "vectors_on_disk": False}) as store:
        store.ensure(DIM)
        store.upsert_segments(make_points())
    (tmp_path / "segments" / LAYOUT_FILE).unlink()
    with EdgeStore(tmp_path, "segments") as store:
        assert (store.layout.quantization, store.layout.vectors_on_disk) == ("none", False)
    with pytest.raises(StoreError, match=r"store\.quantization = none in the store, int8 asked"):
        EdgeStore(tmp_path, "segments", layout={"quantization": "int8"})


def test_search_without_masks_keeps_box_and_area_and_reads_masks_by_id(open_backend) -> None:
    store = open_backend()
    store.ensure(DIM)
    points = make_points()
    store.upsert_segments(points)
    by_id = {p.id: p.payload for p in points}
    light = store.search(points[0].vector, k=4, masks=False)
    full = store.search(points[0].vector, k=4)
    assert [h.id for h in light] == [h.id for h in full]
    for h in light:
        assert h.rle is None and "rle" not in h.to_json()
        assert (h.bbox, h.area, h.path) == (tuple(by_id[h.id]["bbox"]), by_id[h.id]["area"], by_id[h.id]["paths"][0])
    assert [h.rle for h in store.with_masks(light)] == [by_id[h.id]["rle"] for h in light] == [h.rle for h in full]
    with pytest.raises(ValueError, match="without its mask"):
        light[0].mask()


def _segments_on_disk(root: Path) -> list[Path]:
    return sorted((root / "segments" / "segments" / "segments").iterdir())


def test_one_large_batch_is_indexed_in_segments_under_the_cap(tmp_path: Path) -> None:
    """20,000 32-d points (2.4 MB of floats) written in one call with a 1 MB cap: the store builds the
    index each time 8,192 points (1 MB) are written, so the optimized store holds indexed segments of at
    most 8,192 points, not one segment of 20,000 (what the engine does by itself)."""
    dim, n = 32, 20_000
    cap = points_per_segment(dim, 1)
    assert cap == 1024 * 1024 // (4 * dim) == 8192
    vectors = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    points = [make_point(f"/bulk/{i // 100}.jpg", f"{i // 100:064x}", i % 100, 100, vectors[i]) for i in range(n)]
    with EdgeStore(tmp_path, "segments", max_segment_mb=1, indexing_threshold_kb=64) as store:
        store.ensure(dim)
        store.upsert_segments(points)
        store.optimize()
        info = store.index_info()
        assert (info["points"], info["indexed"]) == (n, n)
        # 8,192 + 8,192 + 3,616: the last part does not merge (it and the smallest graph exceed the cap).
        assert info["segments"] == 4  # and the empty appendable segment new writes go to
        for i in range(0, n, 1999):
            assert store.search(vectors[i], k=1)[0].id == points[i].id
    # Each segment stores its vectors as float32 rows: none holds more than the cap's worth.
    vector_bytes = [
        sum(f.stat().st_size for f in seg.rglob("*") if f.is_file() and "vector_storage" in f.parts) for seg in _segments_on_disk(tmp_path)
    ]
    assert len(vector_bytes) == 4 and max(vector_bytes) < 2 * 1024 * 1024


def test_store_optimize_command_indexes_what_was_added_in_bulk(tmp_path: Path) -> None:
    from test_reliability import cli, finish

    dim, n = 32, 10_000
    vectors = np.random.default_rng(1).normal(size=(n, dim)).astype(np.float32)
    points = [make_point(f"/bulk/{i // 100}.jpg", f"{i // 100:064x}", i % 100, 100, vectors[i]) for i in range(n)]
    with EdgeStore(tmp_path / "store", "segments", indexing_threshold_kb=64, max_segment_mb=None) as store:
        store.ensure(dim)
        store.upsert_segments(points)
        assert store.index_info()["indexed"] == 0
    env = {"USE_SEARCH_STORE__INDEXING_THRESHOLD_KB": "64"}
    rc, out, err = finish(cli(["--store", str(tmp_path / "store"), "store", "optimize"], tmp_path / "data", extra_env=env))
    assert rc == 0, err
    assert f"{n:,} of {n:,} points indexed" in out and "(were 0 in" in out
    with EdgeStore(tmp_path / "store", "segments") as store:
        assert store.index_info()["indexed"] == n
    env["USE_SEARCH_STORE__QUANTIZATION"] = "binary"  # the store was made with turbo4 (the default)
    rc, out, err = finish(cli(["--store", str(tmp_path / "store"), "stats"], tmp_path / "data", extra_env=env))
    assert rc == 2 and "Traceback" not in err
    assert "store.quantization = turbo4 in the store, binary asked" in err


def test_a_snapshot_restores_the_layout(tmp_path: Path) -> None:
    from use_search.store.edge_snapshot import restore_snapshot

    with EdgeStore(tmp_path / "a", "segments", layout={"quantization": "turbo4", "payload_on_disk": False}) as store:
        store.ensure(DIM)
        store.upsert_segments(make_points())
        store.snapshot(tmp_path / "snap.tar.gz")
    restore_snapshot(tmp_path / "snap.tar.gz", tmp_path / "b", "segments")
    with EdgeStore(tmp_path / "b", "segments", writable=False) as store:
        assert store.layout == Layout(quantization="turbo4", payload_on_disk=False)
        assert store.count_segments() == len(make_points())
