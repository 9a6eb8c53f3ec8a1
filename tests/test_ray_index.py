"""Distributed indexing on Ray Data: a local 2-CPU Ray cluster gives exactly the points of the
single-process ``Indexer`` the CLI builds (``factory.Runtime.indexer``) on the same photos (tiny preset),
with crop layers off and on; the stages also work without Ray."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from use_search.config import AutoMaskSettings, Settings
from use_search.factory import Runtime, engine_parts
from use_search.indexer.runner import commit
from use_search.indexer.ray_runner import (
    RESULT_KEYS,
    RayOptions,
    SegmentEmbed,
    StoreWriter,
    WriterActor,
    hash_row,
    index_with_ray,
    plan,
    plan_stat,
    read_row,
)
from use_search.store import EdgeStore, SearchFilter, ServerStore, StoreError

EXTS = (".jpg", ".png")
MAX_PIXELS = 50_000_000


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    # 4×4 prompts and no box NMS: ~48 segments per image (the random tiny SAM's masks all span the
    # frame, so NMS would keep one), enough points to compare, cheap on CPU.
    return Settings(
        data_dir=tmp_path_factory.mktemp("data"), preset="tiny", device="cpu", offline=True, batch_images=2,
        image_extensions=EXTS, amg=AutoMaskSettings(points_per_side=4, box_nms_thresh=1.0),
    )


@pytest.fixture(scope="module")
def parts(settings):
    return engine_parts(settings)


@pytest.fixture
def one_thread():
    """Ray workers run torch on one thread (OMP_NUM_THREADS=1); so does the reference run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def snapshot(store) -> tuple[dict, dict]:
    points = {}
    for h in store.scroll_segments():
        payload = dict(h.payload)
        payload.pop("indexed_at")
        points[h.id] = payload
    images = {}
    for e in store.iter_images():
        images[e.path] = (e.sha256, e.width, e.height, e.n_segments, e.model)
    return points, images


@pytest.mark.parametrize("crop_layers", [0, 1])
def test_ray_run_gives_the_points_of_the_cli_single_process_run(tmp_path, photos, settings, crop_layers, one_thread):
    ray = pytest.importorskip("ray", reason="ray[data] is not installed: pip install 'ray[data]'")
    pytest.importorskip("ray.data", reason="ray[data] is not installed: pip install 'ray[data]'")
    # No NMS across crops either (the random masks all span their crop): every crop's masks are kept.
    amg = settings.amg.model_copy(update={"crop_n_layers": crop_layers, "crop_nms_thresh": 1.0})
    settings = settings.model_copy(update={"amg": amg})
    root = photos["voc"].parent
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "empty.png").write_bytes(b"")

    with EdgeStore(tmp_path / "single", "segments") as store:
        single = Runtime.from_settings(settings).indexer(store).index(root)  # what `use-search index` runs
        want_points, want_images = snapshot(store)
    assert single.indexed == 4 and len(want_points) == single.segments >= 4 * 20

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=150 * 1024**2)
    try:
        opts = RayOptions(actor_batch=2, torch_threads=1)
        with EdgeStore(tmp_path / "ray", "segments") as store:
            events = []
            report = index_with_ray(settings, store, root, build_parts=engine_parts, options=opts, on_image=events.append)
            got_points, got_images = snapshot(store)

            assert (report.indexed, report.segments) == (single.indexed, single.segments)
            assert sorted(report.failed) == sorted(single.failed)
            assert sorted((e.path, e.status) for e in events) == sorted(
                [(p, "indexed") for p in want_images] + [(p, "failed") for p, _ in single.failed]
            )
            assert got_images == want_images
            assert got_points.keys() == want_points.keys()
            assert got_points == want_points  # ids and payloads (masks, boxes, scores, model), minus the time

            # The vectors: each single-run point is the nearest neighbour of itself in the Ray store.
            with EdgeStore(tmp_path / "single", "segments") as ref:
                for hit in list(ref.scroll_segments())[:: max(1, len(want_points) // 25)]:
                    vec = _vector_of(ref, hit)
                    best = store.search(vec, k=1)[0]
                    assert best.id == hit.id and best.score == pytest.approx(1.0, abs=1e-5)

            # A rerun finds everything indexed, without reading a file it has a record for.
            again = index_with_ray(settings, store, root, build_parts=engine_parts, options=opts)
            assert (again.indexed, again.skipped, len(again.failed)) == (0, 4, 2)
            assert again.hashed == 2  # the two bad files only
            assert snapshot(store)[0].keys() == want_points.keys()
    finally:
        ray.shutdown()


def _vector_of(store: EdgeStore, hit) -> np.ndarray:
    """The stored vector of one point (qdrant-edge retrieve with vectors)."""
    record = store._segments.retrieve([hit.id], False, True)[0]
    vector = record.vector
    if isinstance(vector, dict):
        vector = next(iter(vector.values()))
    return np.asarray(vector, dtype=np.float32)


def test_stages_without_ray_and_server_writer(tmp_path, photos, settings, parts, one_thread):
    """hash → plan → read → SegmentEmbed → WriterActor on a qdrant-client in-memory server store."""
    from qdrant_client import QdrantClient

    paths = [str(photos["voc"]), str(photos["chelsea"]), str(tmp_path / "missing.png")]
    hashed = [hash_row({"path": p}, MAX_PIXELS) for p in paths]
    assert hashed[2]["error"].startswith("cannot read") and len(hashed[0]["sha256"]) == 64

    server = ServerStore(QdrantClient(":memory:"), "segments")
    decided = plan(server, hashed)
    assert decided.todo == [(paths[0], False), (paths[1], False)]
    assert [(e.path, e.status) for e in decided.events] == [(paths[2], "failed")]

    rows = [read_row({"path": p, "replace": r}, settings.max_image_pixels) for p, r in decided.todo]
    rows.append(read_row({"path": str(tmp_path / "missing.png"), "replace": False}, 10**8))
    actor = SegmentEmbed(settings, build_parts=lambda s: parts)
    results = actor({k: [r[k] for r in rows] for k in rows[0]})
    assert set(results) == set(RESULT_KEYS) and results["error"][2].startswith("cannot read")

    writer = WriterActor(settings, store_factory=lambda s: server)
    events = writer(results)
    assert [(p, s) for p, s in zip(events["path"], events["status"])] == [
        (paths[0], "indexed"), (paths[1], "indexed"), (paths[2], "failed")
    ]
    assert server.count_images() == 2 and server.count_segments() == sum(events["segments"]) > 0
    voc = server.get_image(paths[0])
    assert (voc.size, voc.mtime_ns) == (photos["voc"].stat().st_size, photos["voc"].stat().st_mtime_ns)

    # The fast path: files whose size and mtime match their record are skipped unread; a touched file
    # is hashed again, found unchanged, and its record refreshed.
    st = photos["chelsea"].stat()
    os.utime(photos["chelsea"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    to_hash, fast = plan_stat(server, paths)
    assert to_hash == [paths[1]] and [(e.path, e.status) for e in fast] == [(paths[0], "skipped"), (paths[2], "failed")]
    assert plan_stat(server, paths, verify=True)[0] == paths[:2]
    touched = plan(server, [hash_row({"path": paths[1]}, MAX_PIXELS)])
    assert touched.todo == [] and [w.event.status for w in touched.writes] == ["skipped"]
    assert touched.writes[0].entry.mtime_ns == st.st_mtime_ns + 10**9
    commit(server, touched.writes)
    assert plan_stat(server, paths)[0] == []

    # Planned again: both skipped; a copy of one of them refers to its points, also within one run
    # (written after the run's pipeline then).
    copy = tmp_path / "copy.png"
    copy.write_bytes(photos["chelsea"].read_bytes())
    again = plan(server, [hash_row({"path": p}, MAX_PIXELS) for p in [paths[0], paths[1], str(copy)]])
    assert again.todo == [] and [e.status for e in again.events] == ["skipped", "skipped"]
    assert [(w.event.path, w.event.status, w.copy_of) for w in again.writes] == [(str(copy), "copy", hashed[1]["sha256"])]
    commit(server, again.writes)
    chelsea = {h.id for h in server.scroll_segments(SearchFilter(path=paths[1]))}
    assert chelsea and {h.id for h in server.scroll_segments(SearchFilter(path=str(copy)))} == chelsea
    twin = tmp_path / "copy2.png"
    twin.write_bytes(copy.read_bytes() + b"")
    fresh = ServerStore(QdrantClient(":memory:"), "segments")
    within = plan(fresh, [hash_row({"path": str(copy)}, MAX_PIXELS), hash_row({"path": str(twin)}, MAX_PIXELS)])
    assert within.todo == [(str(copy), False)] and within.events == []
    assert [(w.event.path, w.event.status, w.first) for w in within.after] == [(str(twin), "copy", str(copy))]

    # Another model's vectors are refused before anything is written.
    results["model"] = ["crop-clip:something-else"] * 3
    with pytest.raises(StoreError, match="something-else"):
        StoreWriter(server).write([{k: results[k][i] for k in results} for i in range(3)])
