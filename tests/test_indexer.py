"""Indexer on real photos with the tiny preset and the embedded (qdrant-edge) store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from use_search.factory import Runtime
from use_search.indexer import Indexer, read_image, segment_points
from use_search.masks import decode_rle, mask_bbox
from use_search.model.clip import load_clip
from use_search.model.crop_clip import CropClipEmbedder
from use_search.query import ModelMismatchError, Searcher
from use_search.store import EdgeStore, SearchFilter
from use_search.types import Segment, point_id


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


def test_changed_file_replaces_its_segments_and_duplicate_content_is_skipped(tmp_path, photos, parts):
    root = photos["voc"].parent
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = make_indexer(store, parts)
        ix.index(root)
        old_sha = store.get_image(str(photos["chelsea"])).sha256
        (root / "sub" / "copy.png").write_bytes(photos["astronaut"].read_bytes())
        Image.open(photos["chelsea"]).rotate(90, expand=True).save(photos["chelsea"])

        report = ix.index(root)
        assert (report.indexed, report.duplicates, report.skipped) == (1, 1, 3)  # chelsea changed; copy = astronaut
        chelsea = store.get_image(str(photos["chelsea"]))
        assert chelsea.sha256 != old_sha
        hits = list(store.scroll_segments(SearchFilter(path=str(photos["chelsea"]))))
        assert len(hits) == chelsea.n_segments and all(h.sha256 == chelsea.sha256 for h in hits)
        assert store.count_segments(SearchFilter(sha256=old_sha)) == 0
        assert store.get_image(str(root / "sub" / "copy.png")) is None


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
    """Both copies land in the same commit batch: the second must be a duplicate, not overwrite the first."""
    root = photos["voc"].parent
    (root / "sub" / "astronaut-copy.png").write_bytes(photos["astronaut"].read_bytes())
    with EdgeStore(tmp_path / "store", "segments") as store:
        ix = make_indexer(store, parts)
        ix.batch_images = 8  # everything in one batch
        report = ix.index(root)
        assert (report.indexed, report.duplicates) == (4, 1)
        entries = {e.path: e for e in store.iter_images()}
        copies = {str(root / "sub" / "astronaut-copy.png"), str(photos["astronaut"])}
        assert len(copies & entries.keys()) == 1  # the first in walk order is indexed, the other is the duplicate
        for entry in entries.values():
            segs = list(store.scroll_segments(SearchFilter(sha256=entry.sha256)))
            assert len(segs) == entry.n_segments and all(h.path == entry.path for h in segs)
