"""Mask NMS that merges the texts of duplicate masks (paper §3.1, IoU 0.7 in §4.1)."""

from __future__ import annotations

import numpy as np
import pytest

from use_search.curation.pairs import SegmentTexts, TextEntry, merge_by_mask_nms
from use_search.masks import iou_matrix, mask_bbox
from use_search.types import Segment

H, W = 40, 60


def square(x: int, y: int, side: int = 10, stability: float = 0.9) -> Segment:
    m = np.zeros((H, W), dtype=bool)
    m[y : y + side, x : x + side] = True
    return Segment(mask=m, bbox=mask_bbox(m), area=int(m.sum()), predicted_iou=1.0, stability_score=stability, source="box")


def texts(*words: str, source: str = "caption:txt") -> list[TextEntry]:
    return [TextEntry(w, "phrase", source) for w in words]


def test_known_ious():
    a, b, c, d = square(0, 0), square(1, 0), square(3, 0), square(30, 20)
    ious = iou_matrix([a.rle], [b.rle, c.rle, d.rle])[0]
    # 10×10 squares shifted by 1 px: 90/110; by 3 px: 70/130; apart: 0.
    assert ious == pytest.approx([90 / 110, 70 / 130, 0.0])


def test_duplicates_merge_their_texts_into_the_best_mask():
    a = square(0, 0, stability=0.80)  # IoU(a, b) = 0.818 > 0.7: duplicates
    b = square(1, 0, stability=0.95)
    c = square(3, 0, stability=0.90)  # IoU(b, c) = 70/130 = 0.54 and IoU(a, c) = 0.54: kept
    d = square(30, 20, stability=0.70)  # disjoint: kept
    pairs = [
        SegmentTexts(a, texts("the rabbit", "a white rabbit")),
        SegmentTexts(b, texts("The Rabbit", "the rabbit's face")),  # same text as a's, other case
        SegmentTexts(c, texts("an apple")),
        SegmentTexts(d, texts("the table")),
    ]
    merged = merge_by_mask_nms(pairs, iou_threshold=0.7)
    # Best stability first; b keeps its own mask and gets a's texts after its own, no repeats.
    assert [m.segment for m in merged] == [b, c, d]
    assert [t.text for t in merged[0].texts] == ["The Rabbit", "the rabbit's face", "a white rabbit"]
    assert [t.text for t in merged[1].texts] == ["an apple"]
    assert [t.text for t in merged[2].texts] == ["the table"]
    assert merged[0].segment.rle == b.rle


def test_threshold_is_strict_and_sources_survive():
    a = square(0, 0, stability=0.9)
    b = square(3, 0, stability=0.8)  # IoU 0.538
    merged = merge_by_mask_nms(
        [SegmentTexts(a, texts("a cup", source="caption:coco")), SegmentTexts(b, texts("a mug", source="annotation:vg"))],
        iou_threshold=70 / 130,  # equal IoU is not a duplicate
    )
    assert len(merged) == 2
    merged = merge_by_mask_nms(
        [SegmentTexts(a, texts("a cup", source="caption:coco")), SegmentTexts(b, texts("a mug", source="annotation:vg"))],
        iou_threshold=0.5,
    )
    assert len(merged) == 1
    assert [(t.text, t.source) for t in merged[0].texts] == [("a cup", "caption:coco"), ("a mug", "annotation:vg")]


def test_chain_of_overlaps_is_greedy_not_transitive():
    # a~b and b~c overlap above 0.7, a and c do not: with b best, b absorbs both; with a best,
    # a absorbs b and c stays.
    a, b, c = square(0, 0, stability=0.9), square(1, 0, stability=0.8), square(2, 0, stability=0.7)
    assert iou_matrix([a.rle], [c.rle])[0, 0] == pytest.approx(80 / 120)
    merged = merge_by_mask_nms([SegmentTexts(a, texts("a")), SegmentTexts(b, texts("b")), SegmentTexts(c, texts("c"))])
    assert [[t.text for t in m.texts] for m in merged] == [["a", "b"], ["c"]]
    b.stability_score = 0.99
    merged = merge_by_mask_nms([SegmentTexts(a, texts("a")), SegmentTexts(b, texts("b")), SegmentTexts(c, texts("c"))])
    assert [[t.text for t in m.texts] for m in merged] == [["b", "a", "c"]]


def test_segment_json_is_the_shard_format():
    s = square(5, 7)
    out = SegmentTexts(s, texts("a box")).to_json()
    assert out == {
        "rle": s.rle, "bbox": [5, 7, 10, 10], "area": 100,
        "texts": [{"text": "a box", "kind": "phrase", "source": "caption:txt"}],
    }
    assert merge_by_mask_nms([]) == []


def test_whole_image_mask_does_not_swallow_a_large_object():
    # §3.1: a box over 90% of the image becomes the whole-image mask, with synthetic scores of 1.0. A
    # SAM mask of an object covering 80% of the image overlaps it at IoU 0.8 > 0.7: the object must
    # keep its own mask and texts; the vague whole-image texts join it, after its own.
    from use_search.segmenter.boxes import whole_image_segment

    whole = whole_image_segment(H, W)
    obj = np.zeros((H, W), dtype=bool)
    obj[:, : int(W * 0.8)] = True
    big = Segment(mask=obj, bbox=mask_bbox(obj), area=int(obj.sum()), predicted_iou=0.97, stability_score=0.95, source="box")
    assert iou_matrix([whole.rle], [big.rle])[0, 0] == pytest.approx(0.8)
    for order in ([whole, big], [big, whole]):
        pairs = [SegmentTexts(s, texts("the room") if s is whole else texts("the sofa", "a grey sofa")) for s in order]
        (merged,) = merge_by_mask_nms(pairs, iou_threshold=0.7)
        assert merged.segment is big
        assert [t.text for t in merged.texts] == ["the sofa", "a grey sofa", "the room"]


def test_rank_is_predicted_iou_times_stability():
    # a: stable but SAM doubts it (0.6 × 0.99 = 0.594); b: both high (0.95 × 0.9 = 0.855): b is kept.
    a = square(0, 0, stability=0.99)
    a.predicted_iou = 0.6
    b = square(1, 0, stability=0.9)
    b.predicted_iou = 0.95
    (merged,) = merge_by_mask_nms([SegmentTexts(a, texts("a")), SegmentTexts(b, texts("b"))])
    assert merged.segment is b and [t.text for t in merged.texts] == ["b", "a"]
