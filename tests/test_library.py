"""The library index keeps what it knows: segments belong to content, paths are references to it.

Real photos, the tiny preset, the embedded store (qdrant-edge). Moves, copies, renames and prunes must
never lose segments, never segment known content again, and a rerun repairs a file whose segments
are missing.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import qdrant_edge as qe

from use_search.config import Settings, StoreSettings
from use_search.factory import Runtime
from use_search.indexer import Indexer
from use_search.store import EdgeStore, SearchFilter, open_store

EXTS = (".jpg", ".png")
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("d"), preset="tiny", device="cpu", offline=True)
    rt = Runtime.from_settings(settings)
    return rt.segmenter(), rt.embedder()


class Counting:
    """The real segmenter, counting the images it is given (a known content must not come here)."""

    def __init__(self, segmenter) -> None:
        self.segmenter, self.images = segmenter, 0
        self.image_batch, self.input_size = segmenter.image_batch, segmenter.input_size

    def segment(self, image):
        self.images += 1
        return self.segmenter.segment(image)

    def segment_batch(self, images):
        self.images += len(images)
        return self.segmenter.segment_batch(images)


def indexer(store, parts, **kw) -> Indexer:
    segmenter, embedder = parts
    return Indexer(store, Counting(segmenter), embedder, batch_images=2, extensions=EXTS, **kw)


def segments_by_content(store) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for h in store.scroll_segments():
        out.setdefault(h.sha256, set()).add(h.id)
    return out


def paths_of(store, flt: SearchFilter) -> set[str]:
    """The paths the matching segments are shown under (one the filter asked for)."""
    return {h.path for h in store.scroll_segments(flt)}


def test_rename_and_prune_dance_keeps_every_segment(tmp_path, photos, parts):
    """The D1 reproduction: rename the folder, index it, rename it back, prune both names."""
    root = photos["voc"].parent
    tmp_name = root.with_name("photos_tmp")
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = indexer(store, parts)
        first = ix.index(root)
        want = segments_by_content(store)
        assert first.indexed == 4 and sum(map(len, want.values())) == first.segments > 0

        root.rename(tmp_name)
        ix.index(tmp_name)
        tmp_name.rename(root)
        ix.index(root, prune=True)
        tmp_name.mkdir()
        ix.index(tmp_name, prune=True)

        assert segments_by_content(store) == want  # nothing lost
        assert store.count_images() == 4 and {e.path for e in store.iter_images()} == {str(p) for p in photos.values()}
        assert ix.segmenter.images == 4  # the photos were segmented once, at the first run
        for p in photos.values():  # every path filter finds its image's segments, and only them
            entry = store.get_image(str(p))
            hits = list(store.scroll_segments(SearchFilter(path=str(p))))
            assert {h.id for h in hits} == want[entry.sha256] and all(h.sha256 == entry.sha256 for h in hits)
        assert paths_of(store, SearchFilter(under=str(tmp_name))) == set()


def _drop_content(store: EdgeStore, sha256: str) -> None:
    """Damage: the points of one content vanish (the engine's own delete, behind the indexer's back)."""
    flt = qe.Filter(must=[qe.FieldCondition(key="sha256", match=qe.MatchValue(sha256))])
    store._segments.update(qe.UpdateOperation.delete_points_by_filter(flt))
    store._segments.flush()


@pytest.mark.parametrize("verify", [False, True])
def test_rerun_repairs_a_skipped_file_whose_segments_are_missing(tmp_path, photos, parts, verify):
    root = photos["voc"].parent
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = indexer(store, parts)
        ix.index(root)
        want = segments_by_content(store)
        sha = store.get_image(str(photos["chelsea"])).sha256
        _drop_content(store, sha)
        assert store.count_segments(SearchFilter(path=str(photos["chelsea"]))) == 0

        events = []
        report = ix.index(root, verify=verify, on_image=events.append)
        assert [e.path for e in events if e.status == "indexed"] == [str(photos["chelsea"])]
        assert report.indexed == 1 and report.skipped == 3
        assert segments_by_content(store) == want
        assert ix.index(root).skipped == 4 and ix.segmenter.images == 5


def test_a_moved_folder_is_hashed_not_segmented_and_prune_drops_the_old_paths(tmp_path, photos, parts):
    """D2: a move costs hashing only; the old paths stay until pruned; points stay while referenced."""
    root = photos["voc"].parent
    moved = root.with_name("moved")
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = indexer(store, parts)
        ix.index(root)
        want = segments_by_content(store)
        root.rename(moved)

        report = ix.index(moved)
        assert (report.hashed, report.decoded, report.indexed, report.copies) == (4, 0, 0, 4)
        assert ix.segmenter.images == 4  # only the first run's
        assert segments_by_content(store) == want
        assert paths_of(store, SearchFilter(under=str(moved))) == {str(moved / p.relative_to(root)) for p in photos.values()}
        assert store.count_images() == 8 and store.count_contents() == 4

        # The old folder no longer exists: `index OLD --prune` prunes it instead of refusing.
        gone = ix.index(root, prune=True)
        assert gone.pruned_images == 4 and gone.pruned_segments == 0  # the content is still referenced
        assert store.count_images() == 4 and segments_by_content(store) == want
        assert paths_of(store, SearchFilter(under=str(root))) == set()
        assert ix.index(moved).skipped == 4


def test_a_copy_is_a_new_reference_and_deleting_one_path_keeps_the_other(tmp_path, photos, parts):
    root = photos["voc"].parent
    copy = root / "copy-of-chelsea.png"
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = indexer(store, parts)
        ix.index(root)
        chelsea = segments_by_content(store)[store.get_image(str(photos["chelsea"])).sha256]
        shutil.copy(photos["chelsea"], copy)
        report = ix.index(root)
        assert (report.copies, report.skipped, report.decoded) == (1, 4, 0)
        assert {h.id for h in store.scroll_segments(SearchFilter(path=str(copy)))} == chelsea
        hit = next(iter(store.scroll_segments(SearchFilter(path=str(copy)))))
        assert sorted(hit.paths) == sorted([str(copy), str(photos["chelsea"])])

        photos["chelsea"].unlink()
        pruned = ix.index(root, prune=True)
        assert (pruned.pruned_images, pruned.pruned_segments) == (1, 0)
        assert {h.id for h in store.scroll_segments(SearchFilter(path=str(copy)))} == chelsea
        assert store.count_segments(SearchFilter(path=str(photos["chelsea"]))) == 0
        copy.unlink()
        last = ix.index(root, prune=True)
        assert (last.pruned_images, last.pruned_segments) == (1, len(chelsea))
        assert store.count_segments(SearchFilter(sha256=hit.sha256)) == 0


def test_two_copies_in_one_run_are_segmented_once(tmp_path, photos, parts):
    root = photos["voc"].parent
    twin = root / "sub" / "astronaut-copy.png"
    shutil.copy(photos["astronaut"], twin)
    for pipeline in (False, True):
        with EdgeStore(tmp_path / f"store-{pipeline}", "segments") as store:
            ix = indexer(store, parts, pipeline=pipeline)
            ix.batch_images = 8
            report = ix.index(root)
            assert (report.indexed, report.copies, ix.segmenter.images) == (4, 1, 4)
            sha = store.get_image(str(twin)).sha256
            hits = list(store.scroll_segments(SearchFilter(path=str(twin))))
            assert hits and {h.sha256 for h in hits} == {sha}
            assert all(sorted(h.paths) == sorted([str(twin), str(photos["astronaut"])]) for h in hits)


def test_identical_failing_files_are_each_reported_failed(tmp_path, photos, parts):
    root = photos["voc"].parent
    cut = photos["voc"].read_bytes()[:200]
    for i in range(3):
        (root / f"empty-{i}.jpg").write_bytes(b"")
        (root / f"cut-{i}.jpg").write_bytes(cut)
    for pipeline in (False, True):
        with EdgeStore(tmp_path / f"store-{pipeline}", "segments") as store:
            report = indexer(store, parts, pipeline=pipeline).index(root)
            failed = dict(report.failed)
            assert report.copies == 0 and report.indexed == 4
            assert sorted(failed) == sorted(str(root / f"{k}-{i}.jpg") for k in ("empty", "cut") for i in range(3))
            assert all("empty file" in failed[str(root / f"empty-{i}.jpg")] for i in range(3))


def test_a_no_change_rerun_builds_no_model(tmp_path, photos, tiny_settings, monkeypatch):
    built = []
    for part in ("segmenter", "embedder"):
        real = getattr(Runtime, part)
        monkeypatch.setattr(Runtime, part, lambda self, _real=real, _p=part: built.append(_p) or _real(self))
    root = photos["voc"].parent
    rt = Runtime.from_settings(tiny_settings)
    with rt.store() as store:
        assert rt.indexer(store).index(root).indexed == 4
    assert sorted(built) == ["embedder", "segmenter"]
    built.clear()
    with rt.store() as store:
        again = rt.indexer(store).index(root)
        assert again.skipped == 4 and built == []
        shutil.copy(photos["coffee"], root / "coffee-copy.png")  # a copy needs no model either
        assert rt.indexer(store).index(root).copies == 1 and built == []


def test_a_store_written_before_content_addressing_is_migrated(tmp_path):
    """The fixture (built with the previous code, see fixtures/build_store_v1.py) opens migrated: the same
    points and scores, each point listing every path recorded for its content."""
    with tarfile.open(FIXTURES / "store_v1.tar.gz") as tar:
        tar.extractall(tmp_path)
    want = json.loads((FIXTURES / "store_v1.json").read_text())
    settings = Settings(data_dir=tmp_path / "data", preset="tiny", offline=True, store=StoreSettings(path=tmp_path / "store"))
    with open_store(settings) as store:
        got = {h.id: h for h in store.scroll_segments()}
        assert sorted(got) == [p["id"] for p in want["points"]]
        recorded: dict[str, list[str]] = {}
        for e in want["images"]:
            recorded.setdefault(e["sha256"], []).append(e["path"])
        for p in want["points"]:
            h = got[p["id"]]
            assert (h.sha256, h.segment_index, list(h.bbox), h.area, h.rle["counts"]) == (
                p["sha256"], p["segment_index"], p["bbox"], p["area"], p["counts"]
            )
            assert sorted(h.paths) == sorted(recorded[p["sha256"]]) and "path" not in h.payload
        top = store.search(np.asarray(want["query"], np.float32), k=5)
        assert [h.id for h in top] == [t["id"] for t in want["top"]]
        assert [h.score for h in top] == pytest.approx([t["score"] for t in want["top"]], abs=1e-5)
        a = "/tmp/use-search-fixture/photos/a.jpg"
        assert [h.sha256 for h in store.scroll_segments(SearchFilter(path=a))] == [store.get_image(a).sha256]
        assert store.count_segments(SearchFilter(under="/tmp/use-search-fixture/photos")) == 2
        assert store.count_images() == 4 and store.count_contents() == 2
    with open_store(settings) as store:  # migrated once: reopening finds nothing to do
        assert store.migrate() == 0


def test_cli_move_stats_and_prune(tmp_path, photos):
    """As a user: move the folder, index it (no model work), stats by content and by path, prune --dry-run,
    then `index OLD --prune` on the folder that no longer exists."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200", "USE_SEARCH_CONFIG": "/nonexistent"}

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "use_search", "--preset", "tiny", *args], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    def stats():
        return re.search(r"images: (\d+)  paths: (\d+)  segments: (\d+)", run("stats").stdout).groups()

    root = photos["voc"].parent
    run("index", str(root))
    images, paths, segments = stats()
    assert (images, paths) == ("4", "4")
    moved = root.with_name("moved")
    root.rename(moved)
    r = run("index", str(moved))
    assert re.search(r"known content under a new path \(referenced, not segmented\)\W+4\b", r.stderr), r.stderr
    assert re.search(r"files hashed / decoded\W+4 / 0\b", r.stderr), r.stderr
    assert stats() == ("4", "8", segments)

    dry = run("prune", "--dry-run")
    assert sorted(dry.stdout.split("\n")[:-1]) == sorted(f"would drop {p}" for p in map(str, photos.values()))
    assert stats() == ("4", "8", segments)
    run("index", str(root), "--prune")
    assert stats() == ("4", "4", segments)
    assert run("prune").stdout == ""
