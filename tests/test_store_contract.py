"""One contract for every ``VectorStore``: EdgeStore (embedded), ServerStore over qdrant-client's
in-memory mode, and ServerStore on a live server when ``QDRANT_URL`` is set."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from use_search.config import Settings, StoreSettings
from use_search.store import (
    EdgeStore,
    ImageEntry,
    SearchFilter,
    ServerStore,
    StoreError,
    VectorStore,
    open_store,
    segment_payload,
)
from use_search.types import SegmentPoint, point_id

# qdrant-client's local mode accepts payload indexes but warns that they do nothing there.
pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

DIM = 8
QDRANT_URL = os.environ.get("QDRANT_URL")
ROOT = Path(__file__).resolve().parents[1]

# path -> (sha256, number of segments)
IMAGES = {
    "/photos/2024/a.jpg": ("a" * 64, 3),
    "/photos/2023/b.jpg": ("b" * 64, 2),
    "/other/c.jpg": ("c" * 64, 2),
}


def make_point(
    path: str, sha256: str, index: int, n: int, vector: np.ndarray, model: str = "m1"
) -> SegmentPoint:
    payload = segment_payload(
        paths=[path],
        sha256=sha256,
        width=64,
        height=48,
        segment_index=index,
        n_segments=n,
        rle={"size": [48, 64], "counts": f"rle-{index}"},
        bbox=(index, 2 * index, 10, 20),
        area=100 + index,
        predicted_iou=0.9,
        stability_score=0.95,
        source="auto",
        model=model,
        indexed_at="2024-01-01T00:00:00+00:00",
    )
    return SegmentPoint(id=point_id(sha256, index), vector=vector, payload=payload)


def make_points(seed: int = 0, model: str = "m1") -> list[SegmentPoint]:
    rng = np.random.default_rng(seed)
    return [
        make_point(path, sha, i, n, rng.normal(size=DIM).astype(np.float32), model)
        for path, (sha, n) in IMAGES.items()
        for i in range(n)
    ]


def entry(path: str, sha256: str | None = None, n: int = 0) -> ImageEntry:
    return ImageEntry(
        path=path,
        sha256=sha256 or IMAGES[path][0],
        width=64,
        height=48,
        n_segments=n or IMAGES[path][1],
        model="m1",
        indexed_at="2024-01-01T00:00:00+00:00",
    )


def cosine_ranking(points: list[SegmentPoint], query: np.ndarray) -> list[tuple[str, float]]:
    q = query.astype(np.float64) / np.linalg.norm(query)
    scored = [(p.id, float(p.vector.astype(np.float64) @ q / np.linalg.norm(p.vector))) for p in points]
    return sorted(scored, key=lambda s: -s[1])


# Backends --------------------------------------------------------------------------------------
@pytest.fixture(
    params=[
        "edge",
        "server-memory",
        pytest.param("server-live", marks=pytest.mark.skipif(not QDRANT_URL, reason="QDRANT_URL not set")),
    ]
)
def open_backend(request: pytest.FixtureRequest, tmp_path: Path):
    """``open_(layout=None)``: the backend's store, opened (again) on the same data with these
    creation-time settings (store/layout.py); an embedded store's previous opening is closed first
    (it holds the folder's lock). Everything is closed, a live server's collections dropped, at the end."""
    opened: list[VectorStore] = []
    memory = QdrantClient(":memory:") if request.param == "server-memory" else None
    live_name = f"test_{uuid.uuid4().hex[:12]}"

    def open_(layout: dict | None = None) -> VectorStore:
        if request.param == "edge":
            if opened:
                opened.pop().close()
            s: VectorStore = EdgeStore(tmp_path / "store", "segments", layout=layout)
        elif request.param == "server-memory":
            s = ServerStore(memory, "segments", layout=layout)
        else:
            s = ServerStore.connect(QDRANT_URL, live_name, layout=layout)
        opened.append(s)
        return s

    open_.kind = request.param  # type: ignore[attr-defined]
    yield open_
    if request.param == "server-live" and opened:
        for name in (opened[0].collection, opened[0].images_collection):
            opened[0].client.delete_collection(name)
    for s in opened:
        s.close()


@pytest.fixture
def store(open_backend) -> VectorStore:
    return open_backend()


@pytest.fixture
def loaded(store: VectorStore) -> tuple[VectorStore, list[SegmentPoint]]:
    store.ensure(DIM)
    points = make_points()
    store.upsert_segments(points)
    for path in IMAGES:
        store.put_image(entry(path))
    return store, points


# The contract ----------------------------------------------------------------------------------
def test_ensure_sets_dim_and_rejects_another(store: VectorStore) -> None:
    assert store.dim is None
    store.ensure(DIM)
    assert store.dim == DIM
    store.ensure(DIM)  # idempotent
    with pytest.raises(StoreError, match=r"8-d.*4-d"):
        store.ensure(4)


def test_reads_before_ensure_are_empty_and_writes_fail(store: VectorStore) -> None:
    assert store.search(np.ones(DIM), 5) == []
    assert store.count_segments() == 0
    assert store.count_images() == 0
    assert store.get_image("/photos/2024/a.jpg") is None
    assert list(store.iter_images()) == []
    assert list(store.scroll_segments()) == []
    assert store.get_segments([point_id("a" * 64, 0)]) == []
    with pytest.raises(StoreError, match="ensure"):
        store.upsert_segments(make_points())
    with pytest.raises(StoreError, match="ensure"):
        store.put_image(entry("/other/c.jpg"))


def test_search_ranks_by_cosine(loaded) -> None:
    store, points = loaded
    query = points[3].vector + 0.1 * np.random.default_rng(1).normal(size=DIM).astype(np.float32)
    expected = cosine_ranking(points, query)
    hits = store.search(query, k=4)
    assert [h.id for h in hits] == [i for i, _ in expected[:4]]
    assert hits[0].id == points[3].id
    for hit, (_, score) in zip(hits, expected):
        assert hit.score == pytest.approx(score, abs=1e-5)


def test_search_k(loaded) -> None:
    store, points = loaded
    assert len(store.search(points[0].vector, k=1)) == 1
    assert len(store.search(points[0].vector, k=3)) == 3
    assert len(store.search(points[0].vector, k=100)) == len(points)
    assert store.search(points[0].vector, k=0) == []


def test_search_min_score(loaded) -> None:
    store, points = loaded
    query = points[5].vector
    expected = cosine_ranking(points, query)
    threshold = (expected[1][1] + expected[2][1]) / 2
    hits = store.search(query, k=10, min_score=threshold)
    assert [h.id for h in hits] == [expected[0][0], expected[1][0]]
    assert all(h.score >= threshold for h in hits)


def test_search_filters(loaded) -> None:
    store, points = loaded
    query = points[0].vector

    def ids_of(path_prefix: str) -> set[str]:
        return {p.id for p in points if p.payload["paths"][0].startswith(path_prefix)}

    by_path = store.search(query, k=10, flt=SearchFilter(path="/photos/2023/b.jpg"))
    assert {h.id for h in by_path} == ids_of("/photos/2023/b.jpg")
    assert all(h.path == "/photos/2023/b.jpg" for h in by_path)
    # nearest first within the filtered set too
    in_b = [p for p in points if p.payload["paths"] == ["/photos/2023/b.jpg"]]
    assert [h.id for h in by_path] == [i for i, _ in cosine_ranking(in_b, query)]

    under = store.search(query, k=10, flt=SearchFilter(under="/photos"))
    assert {h.id for h in under} == ids_of("/photos/")
    assert {h.id for h in store.search(query, k=10, flt=SearchFilter(under="/photos/2024/"))} == ids_of(
        "/photos/2024/"
    )
    assert store.search(query, k=10, flt=SearchFilter(under="/photo")) == []  # folders, not prefixes

    by_sha = store.search(query, k=10, flt=SearchFilter(sha256="c" * 64))
    assert {h.id for h in by_sha} == ids_of("/other/")
    assert store.search(query, k=10, flt=SearchFilter(path="/other/c.jpg", sha256="a" * 64)) == []
    assert len(store.search(query, k=10, flt=SearchFilter())) == len(points)


def test_get_segments_in_given_order_skipping_unknown(loaded) -> None:
    store, points = loaded
    unknown = point_id("f" * 64, 0)
    wanted = [points[4].id, unknown, points[0].id, points[6].id]
    hits = store.get_segments(wanted)
    assert [h.id for h in hits] == [points[4].id, points[0].id, points[6].id]
    assert all(h.score == 0.0 for h in hits)
    assert store.get_segments([unknown]) == []
    assert store.get_segments([]) == []


def test_scroll_and_count_segments(loaded) -> None:
    store, points = loaded
    assert store.count_segments() == len(points)
    assert {h.id for h in store.scroll_segments()} == {p.id for p in points}
    flt = SearchFilter(under="/photos")
    assert store.count_segments(flt) == 5
    assert {h.path for h in store.scroll_segments(flt)} == {"/photos/2024/a.jpg", "/photos/2023/b.jpg"}
    assert store.count_segments(SearchFilter(sha256="a" * 64)) == 3
    assert store.count_segments(SearchFilter(path="/nope.jpg")) == 0


def test_scroll_pages_through_many_points(store: VectorStore) -> None:
    store.ensure(DIM)
    rng = np.random.default_rng(2)
    points = [make_point("/many/x.jpg", "d" * 64, i, 600, rng.normal(size=DIM)) for i in range(600)]
    store.upsert_segments(points)
    assert store.count_segments() == 600
    ids = [h.id for h in store.scroll_segments()]
    assert len(ids) == 600 and set(ids) == {p.id for p in points}


def test_images(loaded) -> None:
    store, _ = loaded
    assert store.count_images() == 3
    assert store.get_image("/photos/2024/a.jpg") == entry("/photos/2024/a.jpg")
    assert store.get_image("/nope.jpg") is None
    assert sorted(e.path for e in store.iter_images()) == sorted(IMAGES)
    # the same content indexed under a second path
    copy = entry("/copies/a.jpg", sha256="a" * 64, n=3)
    store.put_image(copy)
    assert sorted(e.path for e in store.find_images("a" * 64)) == ["/copies/a.jpg", "/photos/2024/a.jpg"]
    assert store.find_images("e" * 64) == []
    # put_image overwrites the record for a path
    store.put_image(entry("/other/c.jpg", sha256="e" * 64, n=1))
    assert store.get_image("/other/c.jpg").sha256 == "e" * 64
    assert store.count_images() == 4


def test_image_records_keep_size_and_mtime_and_read_records_without_them(loaded) -> None:
    store, _ = loaded
    # mtime in ns is past 2**53: it must come back exact, not through a float.
    stamped = replace(entry("/photos/2024/a.jpg"), size=1_234_567, mtime_ns=1_733_000_000_123_456_789)
    store.put_images([stamped, entry("/other/c.jpg", n=5)])
    assert store.get_image(stamped.path) == stamped
    assert stamped.matches_stat(1_234_567, 1_733_000_000_123_456_789)
    assert not stamped.matches_stat(1_234_567, 1_733_000_000_123_456_788)
    assert store.get_image("/other/c.jpg").n_segments == 5
    # A record as written before size/mtime existed: the fields are absent, read as unknown.
    legacy = entry("/photos/2023/b.jpg")
    assert set(legacy.payload()) == {"path", "sha256", "width", "height", "n_segments", "model", "indexed_at", "dirs"}
    store.put_image(legacy)
    got = store.get_image(legacy.path)
    assert got == legacy and got.size is None and not got.matches_stat(0, 0)


def test_segment_paths_are_distinct_and_filtered(loaded) -> None:
    store, _ = loaded
    assert sorted(store.segment_paths()) == sorted(IMAGES)
    assert sorted(store.segment_paths(SearchFilter(under="/photos"))) == ["/photos/2023/b.jpg", "/photos/2024/a.jpg"]
    assert list(store.segment_paths(SearchFilter(path="/other/c.jpg"))) == ["/other/c.jpg"]


def test_delete_image_removes_exactly_its_segments_and_record(loaded) -> None:
    store, points = loaded
    assert store.delete_image("/photos/2024/a.jpg") == 3
    assert store.get_image("/photos/2024/a.jpg") is None
    assert store.count_images() == 2
    remaining = {p.id for p in points if p.payload["paths"] != ["/photos/2024/a.jpg"]}
    assert {h.id for h in store.scroll_segments()} == remaining
    assert store.get_image("/photos/2023/b.jpg") is not None
    assert store.delete_image("/photos/2024/a.jpg") == 0
    assert store.delete_image("/never/indexed.jpg") == 0


def test_one_content_under_several_paths_is_one_set_of_points(loaded) -> None:
    store, points = loaded
    a_ids = {p.id for p in points if p.payload["sha256"] == "a" * 64}
    copy = "/copies/2025/a.jpg"
    assert store.add_reference(copy, "a" * 64) == 3
    store.put_image(entry(copy, sha256="a" * 64, n=3))
    assert store.count_segments() == len(points)  # no new points
    query = points[0].vector
    for flt in (SearchFilter(path=copy), SearchFilter(under="/copies"), SearchFilter(under="/copies/2025", sha256="a" * 64)):
        hits = store.search(query, k=10, flt=flt)
        assert {h.id for h in hits} == a_ids and all(h.path == copy for h in hits)  # shown under the path asked for
        assert {h.id for h in store.scroll_segments(flt)} == a_ids and store.count_segments(flt) == 3
    for h in store.scroll_segments(SearchFilter(path="/photos/2024/a.jpg")):
        assert h.path == "/photos/2024/a.jpg" and h.paths == ["/copies/2025/a.jpg", "/photos/2024/a.jpg"]
        assert sorted(h.payload["dirs"]) == ["/", "/copies", "/copies/2025", "/photos", "/photos/2024"]
    assert sorted(store.segment_paths(SearchFilter(sha256="a" * 64))) == [copy, "/photos/2024/a.jpg"]
    assert store.count_images() == 4 and store.count_contents() == 3

    # Deleting one path drops its reference only; the last one takes the points with it.
    assert store.delete_image("/photos/2024/a.jpg") == 0
    assert store.count_segments(SearchFilter(path="/photos/2024/a.jpg")) == 0
    assert store.count_segments(SearchFilter(under="/photos/2024")) == 0
    assert {h.id for h in store.scroll_segments(SearchFilter(path=copy))} == a_ids
    assert store.delete_image(copy) == 3
    assert store.count_segments(SearchFilter(sha256="a" * 64)) == 0 and store.count_segments() == len(points) - 3

    # A content this run still needs is kept without references; a known content gets its path back.
    assert store.remove_reference("/other/c.jpg", "c" * 64, keep={"c" * 64}) == 0
    assert store.content_paths("c" * 64) == [] and store.count_segments(SearchFilter(sha256="c" * 64)) == 2
    assert store.add_reference("/other/c.jpg", "c" * 64) == 2
    assert store.content_paths("c" * 64) == ["/other/c.jpg"]
    assert store.add_reference("/x.jpg", "f" * 64) == 0 and store.content_paths("f" * 64) is None


def test_rerun_upsert_overwrites(loaded) -> None:
    store, points = loaded
    again = make_points(seed=5, model="m2")  # same ids, new vectors and payloads
    store.upsert_segments(again)
    assert store.count_segments() == len(points)
    assert {h.model for h in store.scroll_segments()} == {"m2"}
    hit = store.search(again[2].vector, k=1)[0]
    assert hit.id == again[2].id and hit.score == pytest.approx(1.0, abs=1e-5)


def test_hit_payload_roundtrip(loaded) -> None:
    store, points = loaded
    p = points[1]
    (hit,) = store.get_segments([p.id])
    assert hit.path == "/photos/2024/a.jpg"
    assert hit.sha256 == "a" * 64
    assert hit.segment_index == 1
    assert hit.rle == {"size": [48, 64], "counts": "rle-1"}
    assert hit.bbox == (1, 2, 10, 20) and isinstance(hit.bbox, tuple)
    assert (hit.area, hit.width, hit.height, hit.model) == (101, 64, 48, "m1")
    assert hit.payload == p.payload
    assert store.search(p.vector, k=1)[0].payload == p.payload


# Embedded store only ---------------------------------------------------------------------------
def test_edge_reopen_keeps_everything(tmp_path: Path) -> None:
    points = make_points()
    with EdgeStore(tmp_path, "segments") as store:
        store.ensure(DIM)
        store.upsert_segments(points)
        store.put_image(entry("/other/c.jpg"))
    with EdgeStore(tmp_path, "segments") as store:
        assert store.dim == DIM
        assert store.count_segments() == len(points)
        assert store.get_image("/other/c.jpg") == entry("/other/c.jpg")
        assert store.search(points[2].vector, k=1)[0].id == points[2].id
        assert store.count_segments(SearchFilter(under="/photos")) == 5
        store.ensure(DIM)
        with pytest.raises(StoreError):
            store.ensure(DIM + 1)
    assert (tmp_path / "segments" / "segments").is_dir() and (tmp_path / "segments" / "images").is_dir()


def test_edge_optimize_keeps_results(tmp_path: Path) -> None:
    points = make_points()
    with EdgeStore(tmp_path, "segments") as store:
        store.ensure(DIM)
        store.upsert_segments(points)
        store.optimize()
        assert store.count_segments() == len(points)
        assert store.search(points[4].vector, k=1)[0].id == points[4].id


def _bulk(n: int, dim: int, seed: int, prefix: str) -> list[SegmentPoint]:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    sha = (prefix * 64)[:64]
    return [make_point(f"/{prefix}/{i // 10}.jpg", sha, i, n, vectors[i]) for i in range(n)]


def _segment_dirs(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "segments" / "segments" / "segments").iterdir()}


@pytest.mark.parametrize("max_segment_mb", [1, None])
def test_edge_index_build_after_a_run_covers_only_the_new_points(tmp_path: Path, max_segment_mb) -> None:
    """10,000 points (1.25 MB) built into one HNSW segment, then 1,000 more. With a 1 MB segment cap the
    second optimize builds a graph for the 1,000 new points only: the first graph's segment stays as it
    is. Without a cap (qdrant's default), the engine merges them and rebuilds all 11,000. Points added
    after the last build are found either way, before and after the next build."""
    dim = 32
    first, added = _bulk(10_000, dim, 0, "first"), _bulk(1_000, dim, 1, "added")
    with EdgeStore(tmp_path, "segments", max_segment_mb=max_segment_mb, indexing_threshold_kb=64) as store:
        store.ensure(dim)
        store.upsert_segments(first)
        store.optimize()
        assert store.index_info()["indexed"] == 10_000
        built = _segment_dirs(tmp_path)
        store.upsert_segments(added)
        assert store.index_info() == {**store.index_info(), "points": 11_000, "indexed": 10_000}
        for p in added[::97] + first[::997]:  # unindexed points are scanned exactly
            assert store.search(p.vector, k=1)[0].id == p.id
        store.optimize()
        info = store.index_info()
        assert (info["points"], info["indexed"]) == (11_000, 11_000)
        kept = built & _segment_dirs(tmp_path)
        if max_segment_mb:
            assert len(kept) == 1 and info["segments"] == 3  # the first graph, the new one, an empty appendable
        else:
            assert not kept and info["segments"] == 2  # everything rebuilt into one segment
        for p in added[::97] + first[::997]:
            assert store.search(p.vector, k=1)[0].id == p.id


def test_edge_applies_segment_settings_to_an_existing_store(tmp_path: Path) -> None:
    with EdgeStore(tmp_path, "segments", max_segment_mb=None) as store:
        store.ensure(DIM)
    with EdgeStore(tmp_path, "segments", max_segment_mb=7) as store:
        assert store.dim == DIM
    config = json.loads((tmp_path / "segments" / "segments" / "edge_config.json").read_text())
    assert config["optimizers"]["max_segment_size"] == 7 * 1024


def test_edge_refuses_to_create_or_write_without_free_space(tmp_path: Path) -> None:
    free = {"bytes": 10 * 1024**2}  # below the 16 MB margin alone
    probe = lambda path: free["bytes"]  # noqa: E731
    with pytest.raises(StoreError, match=r"not enough free disk space for the store at .*segments: 10\.0 MB free, a new store"):
        EdgeStore(tmp_path / "s", "segments", free_space=probe)
    assert not (tmp_path / "s").exists()  # nothing created
    free["bytes"] = 10**12
    points = make_points()
    with EdgeStore(tmp_path / "s", "segments", free_space=probe, min_free_bytes=64 * 1024**2) as store:
        store.ensure(DIM)
        store.upsert_segments(points[:3])
        free["bytes"] = 60 * 1024**2
        with pytest.raises(StoreError, match=r"60\.0 MB free, writing 4 segments needs about .* plus the 64\.0 MB safety margin \(setting store\.min_free_mb\)"):
            store.upsert_segments(points[3:])
        with pytest.raises(StoreError, match="image records"):
            store.put_image(entry("/other/c.jpg"))
        assert store.count_segments() == 3  # what was written before stays
    with EdgeStore(tmp_path / "s", "segments") as store:
        assert store.count_segments() == 3


def test_edge_readers_need_no_free_space_and_cannot_write(tmp_path: Path) -> None:
    points = make_points()
    with EdgeStore(tmp_path / "s", "segments") as store:
        store.ensure(DIM)
        store.upsert_segments(points)
        store.put_image(entry("/other/c.jpg"))
    full = lambda path: 0  # noqa: E731
    with pytest.raises(StoreError, match="0.0 MB free"):
        EdgeStore(tmp_path / "s", "segments", free_space=full)  # a writer is refused
    with EdgeStore(tmp_path / "s", "segments", free_space=full, writable=False) as store:
        assert store.count_segments() == len(points) and store.get_image("/other/c.jpg") is not None
        assert [h.id for h in store.search(points[2].vector, k=1)] == [points[2].id]
        with pytest.raises(StoreError, match="open for reading only"):
            store.upsert_segments(points[:1])
        with pytest.raises(StoreError, match="open for reading only"):
            store.delete_image("/other/c.jpg")
    with EdgeStore(tmp_path / "s", "segments") as store:
        assert store.count_segments() == len(points)


def test_edge_second_opener_in_process_is_refused(tmp_path: Path) -> None:
    with EdgeStore(tmp_path, "segments"):
        with pytest.raises(StoreError, match=rf"in use by another process \(pid {os.getpid()}\)"):
            EdgeStore(tmp_path, "segments")
        EdgeStore(tmp_path, "other").close()  # another collection is another store
    EdgeStore(tmp_path, "segments").close()  # free again once closed


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_edge_second_process_gets_store_error_at_once(tmp_path: Path) -> None:
    with EdgeStore(tmp_path, "segments") as store:
        store.ensure(DIM)
        start = time.monotonic()
        result = run_python(
            f"""
            import sys, time
            from use_search.store import EdgeStore, StoreError
            t = time.monotonic()
            try:
                EdgeStore({str(tmp_path)!r}, "segments")
            except StoreError as e:
                print(f"{{time.monotonic() - t:.3f}}", e)
                sys.exit(3)
            sys.exit(0)
            """
        )
        elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stderr
    seconds, message = result.stdout.split(" ", 1)
    assert float(seconds) < 1.0
    assert elapsed < 30
    assert f"store at {tmp_path / 'segments'} is in use by another process (pid {os.getpid()})" in message
    assert "use the server / the API" in message


def test_edge_acknowledged_upsert_survives_sigkill(tmp_path: Path) -> None:
    result = run_python(
        f"""
        import os, signal
        import numpy as np
        from use_search.store import EdgeStore
        from use_search.types import SegmentPoint, point_id
        store = EdgeStore({str(tmp_path)!r}, "segments")
        store.ensure(4)
        points = [SegmentPoint(point_id("x", i), np.ones(4), {{"paths": ["/x.jpg"]}}) for i in range(300)]
        store.upsert_segments(points)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert result.returncode == -9, result.stderr
    with EdgeStore(tmp_path, "segments") as store:  # the dead process's lock went with it
        assert store.count_segments() == 300
        assert store.count_segments(SearchFilter(path="/x.jpg")) == 300


# Construction ----------------------------------------------------------------------------------
def test_open_store_embedded(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, store=StoreSettings(collection="c1"))
    with open_store(settings) as store:
        assert isinstance(store, EdgeStore)
        assert store.root == tmp_path / "store" / "c1"


def test_open_store_server_needs_url(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="store.url"):
        open_store(Settings(data_dir=tmp_path, store=StoreSettings(backend="server")))


def test_unreachable_server_is_a_store_error_naming_the_url(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    settings = Settings(data_dir=tmp_path, store=StoreSettings(backend="server", url=url, timeout_s=2))
    start = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach Qdrant at {url}") as info:
        open_store(settings)
    assert time.monotonic() - start < 10
    assert info.value.__cause__ is None and info.value.__suppress_context__
