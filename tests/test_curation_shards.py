"""Shard writer (numbering, rotation, torn-line repair), resume bookkeeping, Table 1 statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from use_search.curation.shards import ShardWriter, done_images, iter_shard_records, repair_torn_tail, shard_name
from use_search.curation.stats import shard_stats
from use_search.masks import encode_rle


def record(image: str, segments: list[dict], pairs_before_nms: int | None = None) -> dict:
    rec = {"image": image, "sha256": "0" * 64, "width": 4, "height": 3, "segments": segments}
    if pairs_before_nms is not None:
        rec["pairs_before_nms"] = pairs_before_nms
    return rec


def seg(*texts: tuple[str, str, str]) -> dict:
    m = np.zeros((3, 4), dtype=bool)
    m[1, 1:3] = True
    return {"rle": encode_rle(m), "bbox": [1, 1, 2, 1], "area": 2,
            "texts": [{"text": t, "kind": k, "source": s} for t, k, s in texts]}


def test_writer_rotates_and_never_appends_to_old_shards(tmp_path):
    with ShardWriter(tmp_path, records_per_shard=2) as w:
        for i in range(5):
            w.write(record(f"/img/{i}.jpg", []))
    assert [p.name for p in w.written] == [shard_name(0), shard_name(1), shard_name(2)]
    assert [len(p.read_text().splitlines()) for p in w.written] == [2, 2, 1]
    with ShardWriter(tmp_path, records_per_shard=2) as w2:
        w2.write(record("/img/5.jpg", []))
    assert [p.name for p in w2.written] == [shard_name(3)]
    assert [r["image"] for r in iter_shard_records(tmp_path)] == [f"/img/{i}.jpg" for i in range(6)]
    assert done_images(tmp_path) == {f"/img/{i}.jpg" for i in range(6)}


def test_torn_last_line_is_skipped_then_repaired(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write(record("/img/a.jpg", []))
        w.write(record("/img/b.jpg", []))
    shard = w.written[0]
    whole = shard.read_bytes()
    torn = json.dumps(record("/img/c.jpg", [seg(("a cat", "phrase", "caption:txt"))]))[:25]
    shard.write_bytes(whole + torn.encode())
    # Readers skip the torn line: its image is not done.
    assert done_images(tmp_path) == {"/img/a.jpg", "/img/b.jpg"}
    # The next writer cuts it off and starts a new shard.
    with ShardWriter(tmp_path) as w2:
        w2.write(record("/img/c.jpg", []))
    assert shard.read_bytes() == whole
    assert [r["image"] for r in iter_shard_records(tmp_path)] == ["/img/a.jpg", "/img/b.jpg", "/img/c.jpg"]
    assert repair_torn_tail(shard) is False


def test_stats_are_table_1_figures(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write(record("/img/a.jpg", [
            seg(("the rabbit", "phrase", "caption:txt"), ("the rabbit behind the apple", "expression", "caption:txt")),
            seg(("an apple", "phrase", "caption:mllm")),
        ], pairs_before_nms=7))
        w.write(record("/img/b.jpg", [seg(("The rabbit", "phrase", "caption:coco"), ("a dog", "phrase", "caption:coco"))], 3))
        w.write(record("/img/c.jpg", [], 0))
        w.write(record("/img/d.jpg", [seg(("a clock", "expression", "annotation:vg"))]))  # no count: its texts
    s = shard_stats(tmp_path)
    assert (s.images, s.images_with_segments) == (4, 3)
    assert s.pairs == 7 + 3 + 0 + 1
    assert s.pairs_after_nms == 4
    assert s.texts_after_nms == 6
    # "the rabbit" and "The rabbit" are one expression.
    assert s.unique_expressions == 5
    assert s.unique_by_kind == {"expression": 2, "phrase": 3}
    assert s.by_source == {"annotation:vg": 1, "caption:coco": 2, "caption:mllm": 1, "caption:txt": 2}
    # A missing folder, or one without shards, is an error naming it (a table of zeros hid the mistake).
    with pytest.raises(FileNotFoundError, match="no such folder: .*empty"):
        shard_stats(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no pair shards .* in .*empty"):
        shard_stats(tmp_path / "empty")
