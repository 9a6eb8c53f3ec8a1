"""``use-search store check | snapshot | restore`` and damaged stores through the CLI, in real processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_reliability import cli, finish
from test_store_integrity import edge_file, flip
from use_search.store import EdgeStore

ENV = {"USE_SEARCH_AMG__POINTS_PER_SIDE": "4", "USE_SEARCH_AMG__BOX_NMS_THRESH": "1.0"}  # dozens of segments per photo
QUERIES = ("a cat",)


def run(args, data, store):  # type: ignore[no-untyped-def]
    return finish(cli(["--preset", "tiny", "--store", str(store), *args], data, extra_env=ENV))


def results(data, store) -> list[list[tuple[str, str, float]]]:  # type: ignore[no-untyped-def]
    out = []
    for q in QUERIES:
        rc, stdout, err = run(["query", q, "-k", "20", "--json"], data, store)
        assert rc == 0, err
        out.append([(h["id"], h["path"], h["score"]) for h in map(json.loads, stdout.splitlines())])
    return out


def same_results(a, b) -> None:  # type: ignore[no-untyped-def]
    # Re-indexing one image alone may batch its embedding differently: same ids, scores to float32 accuracy.
    assert [[(i, p) for i, p, _ in q] for q in a] == [[(i, p) for i, p, _ in q] for q in b]
    assert np.allclose([s for q in a for *_, s in q], [s for q in b for *_, s in q], atol=1e-5)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, ):  # type: ignore[no-untyped-def]
    from conftest import write_photos

    root = tmp_path_factory.mktemp("lib")
    write_photos(root / "photos")
    data, store = root / "data", root / "pristine"
    rc, _, err = run(["index", str(root / "photos")], data, store)
    assert rc == 0, err
    return root / "photos", data, store, results(data, store)


@pytest.fixture
def copy(indexed, tmp_path):  # type: ignore[no-untyped-def]
    photos, data, pristine, expected = indexed
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    return photos, data, store, expected


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def damage(store: Path) -> None:
    """One point's vector off the unit sphere, one point lost, payload bytes flipped."""
    segs = store / "segments"
    with EdgeStore(store, "segments") as s:
        ids = sorted(s.point_ids())
        stored = s.read_points([ids[0]])[0].vector.astype(np.float32).tobytes()
        s.delete_segments([ids[-1]])
    chunk = edge_file(segs, "vector_storage/vectors/chunk_0.mmap")
    flip(chunk, [chunk.read_bytes().find(stored) + 3])  # the sign/exponent byte of its first value
    flip(edge_file(segs, "payload_storage/page_0.dat"), range(40, 400, 7))


def test_damage_gives_one_line_and_check_repair_restores_identical_results(copy) -> None:
    photos, data, store, expected = copy
    damage(store)
    rc, _, err = run(["query", QUERIES[0], "-k", "1000"], data, store)  # every hit's payload is read
    line = one_error_line(err)
    assert rc == 2 and "is damaged" in line and "store check --repair" in line and "store restore" in line, err

    rc, stdout, err = run(["store", "check"], data, store)
    assert rc == 1 and "store check --repair" in err, (stdout, err)
    kinds = {ln.split(":")[0] for ln in stdout.splitlines()}
    assert {"vector", "missing", "unreadable"} <= kinds, stdout

    rc, stdout, err = run(["store", "check", "--repair"], data, store)
    assert rc == 0, (stdout, err)
    assert "re-indexed" in stdout and stdout.rstrip().endswith("matches its image record"), stdout
    same_results(results(data, store), expected)


def test_index_force_on_flipped_payload_bytes_is_one_line_and_the_advice_works(copy) -> None:
    photos, data, store, expected = copy
    flip(edge_file(store / "segments", "payload_storage/page_0.dat"), range(40, 400, 7))
    rc, _, err = run(["index", "--force", str(photos)], data, store)
    line = one_error_line(err)
    assert rc == 2 and "is damaged" in line and "store check --repair" in line, err
    rc, stdout, err = run(["store", "check", "--repair"], data, store)
    assert rc == 0, (stdout, err)
    rc, _, err = run(["index", str(photos)], data, store)  # what --force dropped before it stopped
    assert rc == 0, err
    same_results(results(data, store), expected)


def test_snapshot_then_restore_on_a_fresh_folder_gives_identical_results(copy, tmp_path) -> None:
    _, data, store, expected = copy
    backup = tmp_path / "backup.tar.gz"
    rc, stdout, err = run(["store", "snapshot", str(backup)], data, store)
    assert rc == 0 and backup.is_file(), err
    rc, _, err = run(["store", "snapshot", str(backup)], data, store)
    assert rc == 2 and "exists" in one_error_line(err)

    fresh = tmp_path / "fresh"
    rc, stdout, err = run(["store", "restore", str(backup)], data, fresh)
    assert rc == 0 and "restored 4 images" in stdout, err
    assert results(data, fresh) == expected  # the same files: bit-identical scores
    rc, _, err = run(["store", "restore", str(backup)], data, fresh)
    assert rc == 2 and "already holds a store" in one_error_line(err)
    rc, stdout, _ = run(["store", "check"], data, fresh)
    assert rc == 0 and "ok" in stdout
