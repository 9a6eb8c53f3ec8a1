"""Eval metrics against independent computations: mIoU / pAcc / mAcc against per-class boolean set
operations, mask mAP against pycocotools' COCOeval run directly (the reference), retrieval AP by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from use_search.eval.metrics import ConfusionMatrix, average_precision, coco_from_dataset, mask_map, segmentation_scores
from use_search.eval.retrieval import QueryResult, judge_hits, score_queries
from use_search.masks import encode_rle
from use_search.types import Hit

IGNORE = 255


# ---------------------------------------------------------------------------------------------------
# Semantic segmentation


def reference_semseg(preds, gts, n_classes, ignore=IGNORE):
    """Independent: per class, boolean intersection / union of the valid pixels, pooled over images."""
    inter = np.zeros(n_classes)
    union = np.zeros(n_classes)
    gt_count = np.zeros(n_classes)
    valid_total = 0
    for p, g in zip(preds, gts):
        valid = g != ignore
        valid_total += int(valid.sum())
        for c in range(n_classes):
            g_c = (g == c) & valid
            p_c = (p == c) & valid
            inter[c] += np.logical_and(g_c, p_c).sum()
            union[c] += np.logical_or(g_c, p_c).sum()
            gt_count[c] += g_c.sum()
    ious = [inter[c] / union[c] for c in range(n_classes) if union[c] > 0]
    accs = [inter[c] / gt_count[c] for c in range(n_classes) if gt_count[c] > 0]
    return 100 * np.mean(ious), 100 * inter.sum() / valid_total, 100 * np.mean(accs), inter, union


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_miou_matches_independent_set_computation(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 12))
    gts, preds = [], []
    for _ in range(3):
        h, w = rng.integers(20, 60, size=2)
        g = rng.integers(0, n, size=(h, w))
        g[rng.random((h, w)) < 0.1] = IGNORE  # ignored pixels
        p = np.where(rng.random((h, w)) < 0.6, g, rng.integers(0, n, size=(h, w)))
        p[rng.random((h, w)) < 0.05] = -1  # unlabeled (no segment) predictions
        gts.append(g)
        preds.append(p)
    if seed == 3:  # one class absent from both (NaN, left out) and one predicted only (IoU 0)
        gts = [np.where(g == n - 1, 0, g) for g in gts]
        preds = [np.where(p == n - 1, 0, p) for p in preds]
        gts = [np.where(g == n - 2, 0, g) for g in gts]
    s = segmentation_scores(preds, gts, n, IGNORE)
    miou, pacc, macc, inter, union = reference_semseg(preds, gts, n)
    assert abs(s.miou - miou) < 1e-9 and abs(s.pacc - pacc) < 1e-9 and abs(s.macc - macc) < 1e-9
    for c in range(n):
        if union[c] > 0:
            assert abs(s.iou[c] - 100 * inter[c] / union[c]) < 1e-9
        else:
            assert np.isnan(s.iou[c])
    if seed == 3:
        assert np.isnan(s.iou[n - 1]) and s.iou[n - 2] == 0.0


def test_perfect_prediction_scores_100_and_accumulation_is_additive():
    rng = np.random.default_rng(7)
    g = rng.integers(0, 5, size=(30, 40))
    g[:3] = IGNORE
    pred = np.where(g == IGNORE, -1, g)  # nothing predicted where the truth is ignored: irrelevant
    s = segmentation_scores([pred], [g], 5)
    assert s.miou == 100.0 and s.pacc == 100.0 and s.macc == 100.0 and s.unlabeled_pixels == 0

    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred, g)
    b.update(np.zeros_like(g), g)
    both = ConfusionMatrix(5)
    both.update(pred, g)
    both.update(np.zeros_like(g), g)
    a += b
    np.testing.assert_array_equal(a.matrix, both.matrix)
    with pytest.raises(ValueError):
        a.update(pred[:2], g)


def test_ground_truth_outside_the_classes_is_an_error():
    """mmseg leaves only the ignore index out; any other value outside 0..C-1 would be counted
    inconsistently (its pixels dropped from the truth, kept as false positives), so it is refused."""
    g = np.array([[0, 1, IGNORE, 7], [2, 9, 7, 0]])
    p = np.zeros_like(g)
    cm = ConfusionMatrix(3, IGNORE)
    with pytest.raises(ValueError, match=r"ground truth of labels/x\.png holds 7, 9: outside the 3 classes \(0\.\.2\)"):
        cm.update(p, g, source="labels/x.png")
    with pytest.raises(ValueError, match="holds -1"):
        cm.update(p[:1, :2], np.array([[0, -1]]))
    assert cm.matrix.sum() == 0  # nothing half-counted
    cm.update(p, np.where((g == 7) | (g == 9), IGNORE, g))  # the same map with those pixels ignored
    assert cm.matrix.sum() == 4


def test_unlabeled_pixels_are_misses_not_false_positives():
    g = np.array([[0, 0, 1, 1]])
    p = np.array([[0, -1, 1, 1]])
    s = segmentation_scores([p], [g], 2)
    assert s.iou[0] == 50.0 and s.iou[1] == 100.0 and s.pacc == 75.0 and s.unlabeled_pixels == 1


# ---------------------------------------------------------------------------------------------------
# Mask mAP: our wrapper must give exactly COCOeval's number


def _box_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _rle(m):
    return encode_rle(m)


def hand_made_coco():
    """Two images, three categories (one without ground truth), a crowd region and a polygon."""
    h, w = 40, 50
    anns, aid = [], 0

    def add(img, cat, mask=None, poly=None, crowd=0):
        nonlocal aid
        aid += 1
        if poly is not None:
            rle = mask_utils.frPyObjects([poly], h, w)[0]
            seg = poly and [poly]
        else:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            seg = _rle(mask)
        anns.append({
            "id": aid, "image_id": img, "category_id": cat, "segmentation": seg, "iscrowd": crowd,
            "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
        })

    add(1, 1, _box_mask(h, w, 0, 0, 20, 20))
    add(1, 1, _box_mask(h, w, 25, 0, 45, 15))
    add(1, 2, _box_mask(h, w, 0, 25, 30, 40))
    add(2, 1, poly=[5.0, 5.0, 30.0, 5.0, 30.0, 30.0, 5.0, 30.0])
    add(2, 2, _box_mask(h, w, 32, 20, 50, 40))
    add(2, 2, _box_mask(h, w, 0, 32, 10, 40), crowd=1)
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}, {"id": 2, "file_name": "b.png", "height": h, "width": w}],
        "categories": [{"id": 1, "name": "head", "supercategory": "animal"}, {"id": 2, "name": "tail", "supercategory": "animal"}, {"id": 3, "name": "wing", "supercategory": "bird"}],
        "annotations": anns,
    }


def hand_made_detections():
    h, w = 40, 50
    d = []

    def add(img, cat, m, score):
        d.append({"image_id": img, "category_id": cat, "segmentation": _rle(m), "score": score})

    add(1, 1, _box_mask(h, w, 0, 0, 20, 18), 0.9)  # IoU 0.9 with a head
    add(1, 1, _box_mask(h, w, 0, 0, 20, 20), 0.3)  # a duplicate of that head, lower score
    add(1, 1, _box_mask(h, w, 25, 0, 38, 15), 0.6)  # IoU 0.65 with the other head
    add(1, 2, _box_mask(h, w, 0, 25, 30, 40), 0.8)  # a perfect tail
    add(1, 2, _box_mask(h, w, 30, 0, 50, 10), 0.85)  # a false positive tail, ranked first
    add(2, 1, _box_mask(h, w, 5, 5, 30, 22), 0.7)  # IoU ~0.68 with the polygon head
    add(2, 2, _box_mask(h, w, 33, 21, 50, 40), 0.95)  # IoU ~0.9 with the tail
    add(2, 2, _box_mask(h, w, 0, 32, 10, 40), 0.99)  # on the crowd region: ignored by COCOeval
    add(2, 3, _box_mask(h, w, 10, 10, 20, 20), 0.5)  # a category with no ground truth at all
    return d


def reference_coco_map(tmp_path, gt: dict, dets: list) -> tuple[float, np.ndarray]:
    """COCOeval exactly as its README runs it: from JSON files, default parameters."""
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    coco = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[0], ev.eval["precision"]


def test_mask_map_equals_cocoeval(tmp_path):
    gt, dets = hand_made_coco(), hand_made_detections()
    ref, precision = reference_coco_map(tmp_path, gt, dets)
    ours = mask_map(coco_from_dataset(gt), dets)
    assert 0 < ref < 1
    assert ours.map == ref * 100  # exactly COCOeval's number
    assert ours.n_detections == len(dets)
    # Per-class AP: the category's own slice of COCOeval's precision, and mean(per class) == mAP.
    for k, c in enumerate([1, 2, 3]):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            assert ours.per_class[c] == pytest.approx(p.mean() * 100, abs=1e-12)
        else:
            assert np.isnan(ours.per_class[c])
    assert np.isnan(ours.per_class[3])
    assert np.nanmean(list(ours.per_class.values())) == pytest.approx(ours.map, abs=1e-9)


def test_mask_map_perfect_and_empty(tmp_path):
    gt = hand_made_coco()
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": _rle(COCO_mask(gt, a)), "score": 1.0}
        for a in gt["annotations"] if not a["iscrowd"]
    ]
    assert mask_map(coco_from_dataset(gt), perfect).map == 100.0
    ref, _ = reference_coco_map(tmp_path, gt, perfect)
    assert ref == 1.0
    empty = mask_map(coco_from_dataset(gt), [])
    assert empty.map == 0.0 and empty.n_detections == 0 and np.isnan(empty.per_class[3])


def COCO_mask(gt, ann):
    coco = coco_from_dataset(gt)
    return coco.annToMask(coco.anns[ann["id"]]).astype(bool)


def test_mask_map_restricted_to_categories_equals_cocoeval_with_same_params(tmp_path):
    gt, dets = hand_made_coco(), hand_made_detections()
    coco = coco_from_dataset(gt)
    ours = mask_map(coco, dets, cat_ids=[2], img_ids=[1, 2])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    ref_coco = COCO(str(tmp_path / "gt.json"))
    from use_search.eval.metrics import _bytes_rle

    ev = COCOeval(ref_coco, ref_coco.loadRes([{**d, "segmentation": _bytes_rle(d["segmentation"])} for d in dets if d["category_id"] == 2]), "segm")
    ev.params.catIds = [2]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ours.map == ev.stats[0] * 100


# ---------------------------------------------------------------------------------------------------
# Retrieval


def test_average_precision_by_hand():
    # relevant at ranks 1, 3, 6 of 3 ground-truth items + 1 never found: (1/1 + 2/3 + 3/6) / 4
    assert average_precision([1, 0, 1, 0, 0, 1], 4) == pytest.approx((1 + 2 / 3 + 0.5) / 4)
    assert average_precision([0, 0], 2) == 0.0 and average_precision([1, 1], 2) == 1.0
    assert np.isnan(average_precision([1], 0))


def _hit(path, mask, score=1.0):
    rle = encode_rle(mask)
    payload = {"path": path, "sha256": path, "segment_index": 0, "bbox": [0, 0, 1, 1], "area": int(mask.sum()),
               "width": mask.shape[1], "height": mask.shape[0], "rle": rle, "model": "m"}
    return Hit.from_payload("x", score, payload)


def test_judge_hits_matches_each_instance_once():
    h, w = 20, 20
    a = _box_mask(h, w, 0, 0, 10, 10)
    b = _box_mask(h, w, 10, 10, 20, 20)
    gt = {"/i1.png": [mask_utils.encode(np.asfortranarray(a.astype(np.uint8))), mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))]}
    hits = [
        _hit("/i1.png", _box_mask(h, w, 0, 0, 10, 9)),  # instance a, IoU 0.9
        _hit("/i1.png", a),  # a again: a duplicate, not a new match
        _hit("/i2.png", a),  # another image: no ground truth there
        _hit("/i1.png", _box_mask(h, w, 10, 10, 20, 14)),  # IoU 0.4 with b: miss
        _hit("/i1.png", b),  # b
    ]
    correct, any_match = judge_hits(hits, gt, 0.5)
    assert correct == [True, False, False, False, True]
    assert any_match == [True, True, False, False, True]
    q = QueryResult(1, "x", 2, 5, correct, any_match, average_precision(correct, 2), 1)
    recall, inst, m = score_queries([q], (1, 3, 5))
    assert recall == {1: 100.0, 3: 100.0, 5: 100.0}
    assert inst == {1: 50.0, 3: 50.0, 5: 100.0}
    assert m == pytest.approx(100 * (1 + 2 / 5) / 2)
