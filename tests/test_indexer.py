"""Indexer on real photos with the tiny preset and the embedded (qdrant-edge) store."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from use_search.factory import Runtime
from use_search.indexer import Indexer, read_image, segment_points
from use_search.masks import decode_rle, mask_bbox
from use_search.model.crop_clip import CropClipEmbedder
from use_search.query import ModelMismatchError, Searcher
from use_search.store import EdgeStore, SearchFilter, StoreFullError
from use_search.store.base import image_id, references
from use_search.types import Segment, SegmentPoint, point_id


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from use_search.config import Settings

    settings = Settings(data_dir=tmp_path_factory.mktemp("d"), preset="tiny", device="cpu", offline=True)
    rt = Runtime.from_settings(settings)
    return rt.segmenter(), rt.embedder()


def make_indexer(store, parts) -> Indexer:
    segmenter, embedder = parts
    return Indexer(store, segmenter, embedder, batch_images=2, extensions=(".jpg", ".png"))


def all_points(store):
    return {h.id: h for h in store.scroll_segments()}


def test_index_rerun_prune_and_corrupt_file(tmp_path, photos, parts):
    root = photos["voc"].parent
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = make_indexer(store, parts)
        events = []
        report = ix.index(root, on_image=events.append)

        assert report.indexed == 4 and {p for p, _ in report.failed} == {str(root / "broken.jpg"), str(root / "empty.png")}
        assert {e.path for e in events if e.status == "failed"} == {str(root / "broken.jpg"), str(root / "empty.png")}
        points = all_points(store)
        assert len(points) == report.segments == sum(e.n_segments for e in store.iter_images())
        assert store.count_images() == 4

        # One point per segment, deterministic ids, payload masks decode to the stated area and bbox.
        for entry in store.iter_images():
            loaded = read_image(Path(entry.path), 10**8)
            assert loaded.record.sha256 == entry.sha256
            mine = [h for h in points.values() if h.path == entry.path]
            assert sorted(h.segment_index for h in mine) == list(range(entry.n_segments))
            for h in mine:
                assert h.id == point_id(entry.sha256, h.segment_index)
                mask = decode_rle(h.rle)
                assert mask.shape == (entry.height, entry.width) == (loaded.record.height, loaded.record.width)
                assert int(mask.sum()) == h.area > 0
                assert mask_bbox(mask) == h.bbox
                assert h.model == ix.embedder.model_id and h.payload["n_segments"] == entry.n_segments

        # A rerun adds nothing.
        again = ix.index(root)
        assert again.indexed == 0 and again.skipped == 4 and all_points(store).keys() == points.keys()

        # Deleting one file and pruning removes exactly its points.
        gone = photos["chelsea"]
        gone_ids = {i for i, h in points.items() if h.path == str(gone)}
        assert gone_ids
        gone.unlink()
        pruned = ix.index(root, prune=True)
        assert (pruned.pruned_images, pruned.pruned_segments) == (1, len(gone_ids))
        assert all_points(store).keys() == points.keys() - gone_ids
        assert store.get_image(str(gone)) is None


def test_changed_file_replaces_its_segments_and_a_copy_refers_to_known_content(tmp_path, photos, parts):
    root = photos["voc"].parent
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = make_indexer(store, parts)
        ix.index(root)
        old_sha = store.get_image(str(photos["chelsea"])).sha256
        (root / "sub" / "copy.png").write_bytes(photos["astronaut"].read_bytes())
        Image.open(photos["chelsea"]).rotate(90, expand=True).save(photos["chelsea"])

        report = ix.index(root)
        assert (report.indexed, report.copies, report.skipped, report.decoded) == (1, 1, 3, 1)  # chelsea changed; copy = astronaut
        chelsea = store.get_image(str(photos["chelsea"]))
        assert chelsea.sha256 != old_sha
        hits = list(store.scroll_segments(SearchFilter(path=str(photos["chelsea"]))))
        assert len(hits) == chelsea.n_segments and all(h.sha256 == chelsea.sha256 for h in hits)
        assert store.count_segments(SearchFilter(sha256=old_sha)) == 0
        copy, astronaut = store.get_image(str(root / "sub" / "copy.png")), store.get_image(str(photos["astronaut"]))
        assert copy.sha256 == astronaut.sha256 and copy.n_segments == astronaut.n_segments
        same = {h.id for h in store.scroll_segments(SearchFilter(path=str(photos["astronaut"])))}
        assert {h.id for h in store.scroll_segments(SearchFilter(path=copy.path))} == same
        assert store.count_segments(SearchFilter(sha256=copy.sha256)) == len(same)  # one set of points


def test_write_stage_with_real_instance_masks(tmp_path, voc, parts):
    """The write stage alone: 19 VOC instance masks → crop-CLIP → points → store → identical masks back."""
    _, embedder = parts
    from use_search.indexer.read import LoadedImage
    from use_search.types import ImageRecord

    rgb = voc["rgb"]
    segments = [Segment(mask=m, bbox=mask_bbox(m), area=int(m.sum()), source="annotation") for m in voc["masks"]]
    loaded = LoadedImage(ImageRecord("/photos/voc.jpg", "ab" * 32, rgb.shape[1], rgb.shape[0]), rgb)
    vectors = embedder.embed_segments(rgb, segments)
    assert vectors.shape == (19, embedder.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    with EdgeStore(tmp_path / "store", "segments") as store:
        store.ensure(embedder.dim)
        store.upsert_segments(segment_points(loaded, segments, vectors, embedder.model_id))
        got = store.get_segments([point_id("ab" * 32, i) for i in range(19)])
        assert [h.segment_index for h in got] == list(range(19))
        for h, m in zip(got, voc["masks"]):
            assert np.array_equal(h.mask(), m) and h.payload["source"] == "annotation"
        # Searching with a segment's own vector finds that segment first, with cosine 1.
        best = Searcher(store, embedder).search_vector(vectors[7], k=3)
        assert best[0].segment_index == 7 and best[0].score == pytest.approx(1.0, abs=1e-5)


def test_query_refuses_vectors_of_another_model(tmp_path, photos, parts):
    segmenter, embedder = parts
    with EdgeStore(tmp_path / "store", "segments") as store:
        make_indexer(store, parts).index(photos["voc"])
        other = CropClipEmbedder(embedder.clip, untrained=True)
        other.model_id = "crop-clip:something-else"
        with pytest.raises(ModelMismatchError, match="something-else"):
            Searcher(store, other).search("a person", k=2)
        hits = Searcher(store, embedder).search("a person", k=2)
        assert hits and hits[0].path == str(photos["voc"])


def test_two_copies_in_one_batch_are_indexed_once(tmp_path, photos, parts):
    """Both copies land in the same commit batch: the second refers to the first's points."""
    root = photos["voc"].parent
    (root / "sub" / "astronaut-copy.png").write_bytes(photos["astronaut"].read_bytes())
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = make_indexer(store, parts)
        ix.batch_images = 8  # everything in one batch
        report = ix.index(root)
        assert (report.indexed, report.copies) == (4, 1)
        entries = {e.path: e for e in store.iter_images()}
        copies = {str(root / "sub" / "astronaut-copy.png"), str(photos["astronaut"])}
        assert copies <= entries.keys()
        for entry in entries.values():
            segs = list(store.scroll_segments(SearchFilter(sha256=entry.sha256)))
            want = sorted(copies) if entry.path in copies else [entry.path]
            assert len(segs) == entry.n_segments and all(h.paths == want for h in segs)


# Incremental fast path --------------------------------------------------------------
def _age(path: Path, seconds: float = 60.0) -> None:
    """Set a file's mtime into the past, as a photo copied in earlier has."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_rerun_opens_no_unchanged_file_and_redoes_exactly_a_changed_one(tmp_path, photos, parts):
    root = photos["voc"].parent
    bmp = root / "sub" / "chelsea.bmp"  # BMP: a rewrite with other pixels keeps the file size
    Image.open(photos["chelsea"]).save(bmp)
    exts = (".jpg", ".png", ".bmp")
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = Indexer(store, *parts, batch_images=2, extensions=exts)
        first = ix.index(root)
        assert (first.indexed, first.hashed, first.decoded) == (5, 5, 5)
        entry = store.get_image(str(bmp))
        assert (entry.size, entry.mtime_ns) == (bmp.stat().st_size, bmp.stat().st_mtime_ns)
        before = all_points(store)

        again = ix.index(root)
        assert (again.skipped, again.hashed, again.decoded, again.indexed) == (5, 0, 0, 0)

        # Same bytes, new mtime ("touch"): hashed once, not decoded, the record's mtime refreshed.
        _age(photos["astronaut"], -5)
        touched = ix.index(root)
        assert (touched.skipped, touched.hashed, touched.decoded) == (5, 1, 0)
        assert store.get_image(str(photos["astronaut"])).mtime_ns == photos["astronaut"].stat().st_mtime_ns
        assert ix.index(root).hashed == 0 and all_points(store).keys() == before.keys()

        # New pixels, same size, mtime put back: the fast path trusts size+mtime; --verify finds it.
        st = bmp.stat()
        Image.open(bmp).rotate(180).save(bmp)
        os.utime(bmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert bmp.stat().st_size == st.st_size
        assert ix.index(root).hashed == 0
        verified = ix.index(root, verify=True)
        assert (verified.hashed, verified.decoded, verified.indexed, verified.skipped) == (5, 1, 1, 4)
        new_sha = store.get_image(str(bmp)).sha256
        assert new_sha != entry.sha256
        assert {h.sha256 for h in store.scroll_segments(SearchFilter(path=str(bmp)))} == {new_sha}

        # A real edit (new content, new mtime): exactly that file is read and re-indexed.
        Image.open(photos["coffee"]).rotate(90, expand=True).save(photos["coffee"])
        events = []
        edited = ix.index(root, on_image=events.append)
        assert (edited.hashed, edited.decoded, edited.indexed, edited.skipped) == (1, 1, 1, 4)
        assert [e.path for e in events if e.status == "indexed"] == [str(photos["coffee"])]
        assert len(events) == 5  # one event per file, skipped ones included


def test_records_without_size_and_mtime_are_hashed_once_then_fast(tmp_path, photos, parts):
    """Stores written before size/mtime were recorded: every file is hashed once (not decoded), its
    record completed, and the next rerun opens nothing."""
    root = photos["voc"].parent
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = make_indexer(store, parts)
        ix.index(root)
        points = all_points(store)
        old_style = [replace(e, size=None, mtime_ns=None) for e in store.iter_images()]
        store.put_images(old_style)
        raw = store._images.retrieve([image_id(str(photos["voc"]))], True, False)[0].payload
        assert "size" not in raw and "mtime_ns" not in raw  # exactly the old payload
        assert store.get_image(str(photos["voc"])).size is None

        rerun = ix.index(root)
        assert (rerun.skipped, rerun.hashed, rerun.decoded, rerun.indexed) == (4, 4, 0, 0)
        assert all(e.size is not None and e.mtime_ns is not None for e in store.iter_images())
        assert ix.index(root).hashed == 0
        assert all_points(store).keys() == points.keys()


# Pipelined runner -------------------------------------------------------------------
def snapshot(store):
    """Points (payload minus the time, and the vector) and records (minus the time), by id / path."""
    points = {}
    for h in store.scroll_segments():
        payload = dict(h.payload)
        payload.pop("indexed_at")
        vector = store._segments.retrieve([h.id], False, True)[0].vector
        vector = next(iter(vector.values())) if isinstance(vector, dict) else vector
        points[h.id] = (payload, np.asarray(vector, np.float32))
    images = {e.path: replace(e, indexed_at="") for e in store.iter_images()}
    return points, images


def _mixed_corpus(root: Path) -> None:
    """Bad files, a copy, a thin image and a FIFO among the photos."""
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "sub" / "astronaut-copy.png").write_bytes((root / "sub" / "astronaut.png").read_bytes())
    Image.new("RGB", (1, 3000), (200, 30, 30)).save(root / "thin.png")  # FailsOn refuses it
    os.mkfifo(root / "pipe.jpg")


class FailsOn:
    """The real segmenter, except that it raises for images of one shape, the way a segmenter reports
    an image it cannot cut: a batch holding one fails as a whole (the runner must then isolate it)."""

    def __init__(self, segmenter, shape: tuple[int, int]) -> None:
        self.segmenter, self.shape = segmenter, shape
        self.image_batch, self.input_size = segmenter.image_batch, segmenter.input_size

    def _check(self, image) -> None:
        if image.shape[:2] == self.shape:
            raise ValueError(f"image is {self.shape[1]}×{self.shape[0]}: too thin to segment")

    def segment(self, image):
        self._check(image)
        return self.segmenter.segment(image)

    def segment_batch(self, images):
        for image in images:
            self._check(image)
        return self.segmenter.segment_batch(images)


def test_pipelined_runner_writes_the_points_of_the_sequential_one(tmp_path, photos, parts):
    root = photos["voc"].parent
    extra = root / "extra.png"
    Image.open(photos["voc"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(extra)
    segmenter, embedder = parts
    segmenter = FailsOn(segmenter, (3000, 1))

    def run(store_dir: Path, pipeline: bool):
        with EdgeStore(store_dir, "segments") as store:
            ix = Indexer(
                store, segmenter, embedder, batch_images=2, extensions=(".jpg", ".png"), pipeline=pipeline,
                decode_threads=3, image_batch=2,
            )
            events = []
            report = ix.index(root, on_image=events.append)
            return report, events, snapshot(store)

    # A first state: the photos indexed; then a changed file, a removed one and the bad corpus.
    for name in ("seq", "pipe"):
        with EdgeStore(tmp_path / name, "segments") as store:
            Indexer(store, *parts, batch_images=2, extensions=(".jpg", ".png"), pipeline=False).index(root)
    Image.open(photos["chelsea"]).rotate(90, expand=True).save(photos["chelsea"])
    extra.unlink()
    _mixed_corpus(root)

    seq_report, seq_events, (seq_points, seq_images) = run(tmp_path / "seq", pipeline=False)
    pipe_report, pipe_events, (pipe_points, pipe_images) = run(tmp_path / "pipe", pipeline=True)

    statuses = {e.path: e.status for e in seq_events}
    assert statuses[str(photos["chelsea"])] == "indexed"
    assert statuses[str(root / "sub" / "astronaut-copy.png")] == "copy"
    assert {statuses[str(root / n)] for n in ("broken.jpg", "empty.png", "pipe.jpg", "thin.png")} == {"failed"}
    assert dict(seq_report.failed)[str(root / "thin.png")] == "ValueError: image is 1×3000: too thin to segment"
    assert sorted((e.path, e.status, e.segments, e.reason) for e in pipe_events) == sorted(
        (e.path, e.status, e.segments, e.reason) for e in seq_events
    )
    assert len(pipe_events) == len(list(root.rglob("*.[jp][pn]g")))  # one event per file
    for field_ in ("indexed", "skipped", "copies", "segments", "hashed", "decoded"):
        assert getattr(pipe_report, field_) == getattr(seq_report, field_), field_
    assert sorted(pipe_report.failed) == sorted(seq_report.failed)

    assert pipe_images == seq_images and str(photos["chelsea"]) in pipe_images
    assert pipe_points.keys() == seq_points.keys()
    for pid, (payload, vector) in seq_points.items():
        assert pipe_points[pid][0] == payload
        assert np.allclose(pipe_points[pid][1], vector, atol=1e-6)


def test_pipeline_keeps_a_bounded_number_of_images_in_flight(tmp_path, parts, monkeypatch):
    """Host memory stays flat in the number of images: reads never run far ahead of the model."""
    import use_search.indexer.runner as runner

    root = tmp_path / "many"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(14):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    reads, ahead = [], []  # files opened so far; at each model call, files opened but not yet segmented
    real_read = runner.read_file

    def counting_read(path, *args):
        reads.append(path)
        return real_read(path, *args)

    segmenter, embedder = parts

    class Watched:  # the real segmenter, recording how far reading has run ahead of it
        image_batch = 1
        input_size = segmenter.input_size
        segmented = 0

        def segment(self, image):
            return segmenter.segment(image)

        def segment_batch(self, images):
            self.segmented += len(images)
            ahead.append(len(reads) - self.segmented)
            return segmenter.segment_batch(images)

    monkeypatch.setattr(runner, "read_file", counting_read)
    with EdgeStore(tmp_path / "store", "segments") as store:
        report = Indexer(store, Watched(), embedder, batch_images=2, extensions=(".png",), decode_threads=1).index(root)
    assert report.indexed == 14 and len(ahead) == 14
    window = 2 * 1 + 1
    assert max(ahead) <= 2 * window + 1  # read stage + decode stage windows + one group
    assert max(ahead) < 14 - 3


def test_a_full_disk_stops_the_run_cleanly_and_the_rerun_completes(tmp_path, photos, parts):
    """A fake free-space probe: the disk "fills" after a few commits. The run stops with StoreFullError
    naming the store folder; every recorded image has all its segments; the rerun finishes the job."""
    root = photos["voc"].parent
    with EdgeStore(tmp_path / "ref", "segments") as store:
        make_indexer(store, parts).index(root)
        want_points, want_images = snapshot(store)

    free = {"bytes": 10**12, "writes": 0}

    def probe(path: Path) -> int:
        assert str(path).startswith(str(tmp_path / "full"))
        free["writes"] += 1
        # Opening and creating the store take 4 checks, each commit of one image 2: the third image fails.
        return free["bytes"] if free["writes"] < 9 else 100 * 1024**2  # under the 256 MB margin

    for pipeline in (False, True):
        store_dir = tmp_path / "full" / ("pipe" if pipeline else "seq")
        free["writes"] = 0
        with EdgeStore(store_dir, "segments", free_space=probe, min_free_bytes=256 * 1024**2) as store:
            ix = Indexer(store, *parts, batch_images=1, extensions=(".jpg", ".png"), pipeline=pipeline)
            with pytest.raises(StoreFullError, match=r"not enough free disk space for the store at .*full.*100\.0 MB free"):
                ix.index(root)
            done = list(store.iter_images())
            assert 0 < len(done) < 4
            for e in done:  # nothing half-written looks done
                assert store.count_segments(SearchFilter(path=e.path)) == e.n_segments
        with EdgeStore(store_dir, "segments") as store:
            rerun = make_indexer(store, parts).index(root)
            assert rerun.indexed == 4 - len(done) and rerun.skipped == len(done)
            got_points, got_images = snapshot(store)
        assert got_images.keys() == want_images.keys() and got_points.keys() == want_points.keys()


def path_sha(path: str) -> str:
    import hashlib

    return hashlib.sha256(path.encode()).hexdigest()


# Prune -----------------------------------------------------------------------------
def test_prune_drops_orphan_segments_left_by_a_crash(tmp_path, photos, parts):
    root = photos["voc"].parent
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = make_indexer(store, parts)
        ix.index(root)
        # A crash after the points, before the record; then the file was deleted. And the same
        # leftovers for a path outside the folder, which a prune of this folder must not touch.
        template = next(iter(store.scroll_segments()))
        vec = np.ones(ix.embedder.dim, np.float32)

        def leftover(path: str, n: int) -> None:  # the points of a content no record names, listing the path
            sha = path_sha(path)
            store.upsert_segments([
                SegmentPoint(point_id(sha, i), vec, {**template.payload, "sha256": sha, "segment_index": i, **references([path])})
                for i in range(n)
            ])

        gone = str(root / "sub" / "deleted-before-rerun.png")
        elsewhere = str(tmp_path / "other" / "x.png")
        leftover(gone, 3)
        leftover(elsewhere, 2)
        total = store.count_segments()

        report = ix.index(root, prune=True)
        assert (report.pruned_images, report.pruned_orphans, report.pruned_segments) == (0, 1, 3)
        assert store.count_segments(SearchFilter(path=gone)) == 0
        assert store.count_segments(SearchFilter(path=elsewhere)) == 2
        assert store.count_segments() == total - 3


@pytest.mark.parametrize("models", ["given", "built on first use"])
def test_big_photos_are_segmented_at_the_working_size_and_stored_at_their_own(tmp_path, parts, models):
    """A 1200×900 photo under a 256 px SAM: segmented and embedded at 256×192, the segment geometry
    stored at 1200×900, each mask the nearest-neighbour enlargement of the mask found at the working
    size (``resize_mask``, the plain reference). The SAM is the stress-test one (dozens of distinct
    masks, not the tiny preset's one full-frame mask). Before, every candidate mask was built at full
    size: a 7000×7000 photo took 101 s and 3.2 GB with the tiny preset, now 10 s and 1.6 GB."""
    import skimage.data
    from amg_stress import POINTS, stress_sam

    from use_search.imaging import decode_work, resize_mask, working_side
    from use_search.segmenter.automatic import AutoMaskParams
    from use_search.segmenter.batched import BatchedAutoSegmenter, BatchOptions

    segmenter = BatchedAutoSegmenter(stress_sam(), AutoMaskParams(points_per_side=POINTS), BatchOptions())
    embedder = parts[1]
    side = working_side(segmenter, None)
    assert side == 256 and working_side(segmenter, 0) is None and working_side(segmenter, 512) == 512
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(skimage.data.astronaut()).resize((1200, 900)).save(root / "big.png")
    small = decode_work((root / "big.png").read_bytes(), 10**8, side).pixels
    assert small.shape == (192, 256, 3)
    want = segmenter.segment(small)
    want_vectors = embedder.embed_segments(small, want)
    assert len(want) >= 10 and len({s.area for s in want}) >= 10

    if models == "given":
        indexer_of = lambda store: Indexer(store, segmenter, embedder, extensions=(".png",), work_side=side)  # noqa: E731
    else:  # as the CLI's factory builds it: the working size is known only once the models are
        indexer_of = lambda store: Indexer(store, build=lambda: (segmenter, embedder, side), extensions=(".png",))  # noqa: E731
    with EdgeStore(tmp_path / "store", "segments") as store:
        report = indexer_of(store).index(root)
        assert report.indexed == 1 and report.segments == len(want)
        entry = store.get_image(str(root / "big.png"))
        assert (entry.width, entry.height) == (1200, 900)
        hits = sorted(store.scroll_segments(), key=lambda h: h.segment_index)
        for h, s, v in zip(hits, want, want_vectors):
            assert (h.width, h.height) == (1200, 900)
            mask = decode_rle(h.rle)
            np.testing.assert_array_equal(mask, resize_mask(s.mask, 900, 1200))
            assert h.area == int(mask.sum()) and tuple(h.bbox) == mask_bbox(mask)
            top = store.search(np.asarray(v, dtype=np.float32), k=1)[0]
            assert top.id == h.id and top.score == pytest.approx(1.0, abs=1e-4)
