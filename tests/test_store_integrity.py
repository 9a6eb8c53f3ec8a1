"""Store integrity on real stores: damaged files are found (``check_store``), engine failures after open
are ``StoreDamagedError``s, a lost shard config does not empty the store, snapshots restore exactly."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from use_search.masks import encode_rle, mask_bbox
from use_search.store import EdgeStore, ImageEntry, ServerStore, StoreDamagedError, StoreError, segment_payload
from use_search.store.base import references
from use_search.store.check import check_store, norm_tolerance
from use_search.types import SegmentPoint, point_id

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

DIM = 16
H, W = 24, 32
IMAGES = {f"/photos/{name}.jpg": (name * 64, n) for name, n in (("a", 4), ("b", 3), ("c", 5))}


def sound_points(seed: int = 0) -> list[SegmentPoint]:
    """Points whose payloads are what the indexer writes: real RLE masks with their own box and area."""
    rng = np.random.default_rng(seed)
    points = []
    for path, (sha, n) in IMAGES.items():
        for i in range(n):
            mask = np.zeros((H, W), bool)
            y, x = rng.integers(0, H - 4), rng.integers(0, W - 4)
            mask[y : y + rng.integers(2, 5), x : x + rng.integers(2, 5)] = True
            payload = segment_payload(
                paths=[path], sha256=sha, width=W, height=H, segment_index=i, n_segments=n, rle=encode_rle(mask),
                bbox=mask_bbox(mask), area=int(mask.sum()), predicted_iou=0.9, stability_score=0.95,
                source="auto", model="m1", indexed_at="2024-01-01T00:00:00+00:00",
            )
            points.append(SegmentPoint(point_id(sha, i), rng.normal(size=DIM).astype(np.float32), payload))
    return points


def fill(store) -> list[SegmentPoint]:  # type: ignore[no-untyped-def]
    store.ensure(DIM)
    points = sound_points()
    store.upsert_segments(points)
    store.put_images([
        ImageEntry(path, sha, W, H, n, "m1", "2024-01-01T00:00:00+00:00") for path, (sha, n) in IMAGES.items()
    ])
    return points


def edge_file(root: Path, pattern: str) -> Path:
    found = glob.glob(str(root / "segments" / "segments" / "*" / pattern))
    assert len(found) == 1, found
    return Path(found[0])


def flip(path: Path, offsets) -> None:  # type: ignore[no-untyped-def]
    with open(path, "r+b") as f:
        for at in offsets:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0xFF]))


def ranking(store, queries) -> list[list[tuple[str, float]]]:  # type: ignore[no-untyped-def]
    return [[(h.id, h.score) for h in store.search(q, k=20)] for q in queries]


@pytest.fixture(params=["edge", "server-memory"])
def any_store(request, tmp_path):  # type: ignore[no-untyped-def]
    s = EdgeStore(tmp_path / "store", "c") if request.param == "edge" else ServerStore(QdrantClient(":memory:"), "c")
    yield s
    s.close()


def test_a_sound_store_checks_clean(any_store) -> None:
    fill(any_store)
    report = check_store(any_store)
    assert report.problems == []
    assert (report.images, report.points) == (3, 12)


def test_copies_share_points_and_must_all_be_listed(any_store) -> None:
    # Content-addressed segments: a second path of content "a" is a record plus a reference on its points.
    points = fill(any_store)
    a_path, (a_sha, n) = next(iter(IMAGES.items()))
    any_store.add_references([("/copies/a.jpg", a_sha)])
    any_store.put_images([ImageEntry("/copies/a.jpg", a_sha, W, H, n, "m1", "2024-01-01T00:00:00+00:00")])
    clean = check_store(any_store)
    assert (clean.problems, clean.images, clean.points) == ([], 4, 12)
    # One of its points forgets the copy: a payload problem, and repair takes in every path of the content.
    first = points[0]
    any_store.upsert_segments([SegmentPoint(first.id, first.vector, {**first.payload, **references([a_path])})])
    report = check_store(any_store)
    assert [(p.kind, p.point_id, p.path) for p in report.problems] == [("payload", first.id, "/copies/a.jpg")]
    assert "/copies/a.jpg" in report.problems[0].detail and report.damaged_paths() == ["/copies/a.jpg", a_path]


def test_the_norm_tolerance_holds_for_engine_normalised_vectors(tmp_path) -> None:
    # The engine normalises in float32; the bound must hold for every vector it stored (else false alarms).
    with EdgeStore(tmp_path / "store", "c") as store:
        fill(store)
        got = store.read_points(list(store.point_ids()))
    norms = [abs(float(np.linalg.norm(p.vector.astype(np.float64))) - 1) for p in got]
    assert len(got) == 12 and max(norms) <= norm_tolerance(DIM)


def test_damage_is_found_point_by_point(any_store) -> None:
    points = fill(any_store)
    # A vector scaled off the unit sphere, a payload whose box no longer matches its mask, a lost point,
    # a point no record claims.
    bad_vector, bad_box, lost = points[0], points[5], points[9]
    any_store.delete_segments([lost.id])
    any_store.upsert_segments([SegmentPoint(bad_box.id, bad_box.vector, {**bad_box.payload, "bbox": [0, 0, 1, 1]})])
    stray = SegmentPoint(
        point_id("d" * 64, 0), points[1].vector, {**points[0].payload, **references(["/gone.jpg"]), "sha256": "d" * 64}
    )
    any_store.upsert_segments([stray])
    if isinstance(any_store, EdgeStore):
        chunk = edge_file(any_store.root, "vector_storage/vectors/chunk_0.mmap")
        stored = any_store.read_points([bad_vector.id])[0].vector.astype(np.float32).tobytes()
        at = chunk.read_bytes().find(stored)
        assert at >= 0
        flip(chunk, [at + 3])  # the sign/exponent byte of its first value
    else:  # qdrant-client's local mode holds vectors in a numpy array (the API refuses bad ones)
        local = any_store.client._client.collections[any_store.collection]
        local.vectors[""][local.ids[bad_vector.id]] *= 3
    report = check_store(any_store)
    by_kind = {(p.kind, p.point_id, p.path) for p in report.problems}
    assert ("missing", lost.id, lost.payload["paths"][0]) in by_kind
    assert ("orphan", stray.id, "/gone.jpg") in by_kind
    assert any(k == "payload" and i == bad_box.id and "bbox" in p.detail for p in report.problems
               for k, i in [(p.kind, p.point_id)])
    vec = [p for p in report.problems if p.kind == "vector"]
    owner = bad_vector.payload["paths"][0]
    assert [(p.point_id, p.path) for p in vec] == [(bad_vector.id, owner)], report.problems
    assert set(report.damaged_paths()) == {owner, bad_box.payload["paths"][0], lost.payload["paths"][0], "/gone.jpg"}
    assert len(report.problems) == 4, report.problems


def test_flipped_payload_bytes_are_a_store_damaged_error_and_check_names_the_points(tmp_path) -> None:
    with EdgeStore(tmp_path / "store", "c") as store:
        points = fill(store)
        before = {h.id for h in store.scroll_segments()}
    page = edge_file(tmp_path / "store" / "c", "payload_storage/page_0.dat")
    flip(page, range(40, 200, 7))  # inside the first stored payloads
    with EdgeStore(tmp_path / "store", "c") as store:
        with pytest.raises(StoreDamagedError, match=r"store check --repair.*store restore"):
            list(store.scroll_segments())
        report = check_store(store)
    assert before == {p.id for p in points}
    unreadable = [p for p in report.problems if p.kind in ("unreadable", "payload")]
    assert unreadable and all(p.path in IMAGES for p in unreadable)
    assert "Failed to decode" in " ".join(p.detail for p in unreadable) or any(p.kind == "payload" for p in unreadable)


def test_a_lost_shard_config_does_not_empty_the_store(tmp_path) -> None:
    with EdgeStore(tmp_path / "store", "c") as store:
        points = fill(store)
        queries = [p.vector for p in points[:3]]
        expected = ranking(store, queries)
    (tmp_path / "store" / "c" / "segments" / "edge_config.json").unlink()
    with EdgeStore(tmp_path / "store", "c") as store:
        assert (store.dim, store.count_segments(), store.count_images()) == (DIM, 12, 3)
        assert ranking(store, queries) == expected
        store.ensure(DIM)  # not created anew over its data
        assert store.count_segments() == 12


def test_snapshot_restores_identical_search_results_on_a_fresh_folder(tmp_path) -> None:
    with EdgeStore(tmp_path / "store", "c", indexing_threshold_kb=1) as store:
        points = fill(store)
        store.optimize()
        queries = [p.vector + 0.1 for p in points[::2]]
        expected = ranking(store, queries)
        images = sorted(e.path for e in store.iter_images())
        store.snapshot(tmp_path / "backup.tar.gz")
        assert ranking(store, queries) == expected  # the store is open again after the snapshot
    from use_search.store.edge_snapshot import restore_snapshot

    manifest = restore_snapshot(tmp_path / "backup.tar.gz", tmp_path / "fresh", "c")
    assert (manifest["points"], manifest["images"], manifest["dim"]) == (12, 3, DIM)
    with EdgeStore(tmp_path / "fresh", "c") as store:
        assert ranking(store, queries) == expected
        assert sorted(e.path for e in store.iter_images()) == images
        assert check_store(store).problems == []
    with pytest.raises(StoreError, match="already holds a store"):
        restore_snapshot(tmp_path / "backup.tar.gz", tmp_path / "fresh", "c")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a snapshot")
    with pytest.raises(StoreError, match="not a use-search snapshot"):
        restore_snapshot(tmp_path / "junk.tar.gz", tmp_path / "other", "c")


def test_snapshot_is_refused_clearly_on_the_server_backend() -> None:
    store = ServerStore(QdrantClient(":memory:"), "c")
    fill(store)
    with pytest.raises(StoreError, match="not supported on this backend"):
        store.snapshot(Path("/nonexistent/out.tar.gz"))
