import numpy as np
import pytest
from scipy import ndimage

from use_search.masks import (
    decode_rle, encode_rle, iou_matrix, mask_bbox, mask_nms, patch_weights, remove_small_regions, rle_area, rle_bbox,
)


def test_rle_roundtrip_on_real_instance_masks(voc):
    for mask in voc["masks"]:
        rle = encode_rle(mask)
        assert isinstance(rle["counts"], str)
        assert np.array_equal(decode_rle(rle), mask)
        assert rle_area(rle) == int(mask.sum())
        assert rle_bbox(rle) == mask_bbox(mask)


def test_mask_bbox_is_tight_xywh():
    m = np.zeros((10, 20), bool)
    m[2:5, 7:11] = True
    assert mask_bbox(m) == (7, 2, 4, 3)
    assert mask_bbox(np.zeros((4, 4), bool)) == (0, 0, 0, 0)


def test_iou_matrix_matches_numpy():
    rng = np.random.default_rng(0)
    masks = [rng.random((30, 40)) > t for t in (0.3, 0.5, 0.7)]
    got = iou_matrix([encode_rle(m) for m in masks], [encode_rle(m) for m in masks])
    for i, a in enumerate(masks):
        for j, b in enumerate(masks):
            assert got[i, j] == pytest.approx((a & b).sum() / (a | b).sum())


def test_fill_small_holes_by_size_only_like_segment_anything():
    m = np.zeros((40, 40), bool)
    m[5:35, 5:35] = True
    m[10:12, 10:12] = False  # 4-px hole
    m[15:30, 15:30] = False  # 225-px hole
    out, changed = remove_small_regions(m, 50, "holes")
    assert changed and out[10:12, 10:12].all()
    assert not out[15:30, 15:30].any()
    assert not out[0].any()  # the 700-px outer background is large
    # A small background region touching the border is filled too (segment-anything: by size only).
    edge = np.zeros((20, 20), bool)
    edge[:, 2:] = True
    out, changed = remove_small_regions(edge, 50, "holes")
    assert changed and out.all()
    # Diagonal neighbours connect (8-connectivity): two 4-px corners touching diagonally are one
    # 8-px island, kept at threshold 6.
    diag = np.zeros((10, 10), bool)
    diag[2:4, 2:4] = True
    diag[4:6, 4:6] = True
    out, changed = remove_small_regions(diag, 6, "islands")
    assert not changed and out.sum() == 8


def test_remove_small_islands_keeps_largest_when_all_small():
    m = np.zeros((40, 40), bool)
    m[0:20, 0:20] = True
    m[30:32, 30:32] = True
    out, changed = remove_small_regions(m, 10, "islands")
    assert changed and out[0:20, 0:20].all() and not out[30:32, 30:32].any()
    tiny = np.zeros((10, 10), bool)
    tiny[1, 1] = True
    tiny[5:7, 5:7] = True
    kept, changed = remove_small_regions(tiny, 100, "islands")
    assert kept.sum() == 4 and changed  # the largest island survives; segment-anything still says "changed"
    assert remove_small_regions(np.zeros((5, 5), bool), 10, "islands")[1] is False
    assert remove_small_regions(np.ones((5, 5), bool), 10, "holes")[1] is False


def _cv2_remove_small_regions(mask, area, mode):
    """segment-anything's own, with OpenCV (opencv-python-headless, dev extra)."""
    from segment_anything.utils.amg import remove_small_regions as sam_remove_small_regions

    return sam_remove_small_regions(mask, area, mode)


def test_remove_small_regions_equals_segment_anything_with_opencv():
    """Random blobby masks, both modes, and equal-sized islands (the tie-break for the largest)."""
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        noise = rng.random((h, w))
        cases.append(ndimage.uniform_filter(noise, size=int(rng.integers(1, 5))) > rng.uniform(0.3, 0.7))
    for _ in range(100):  # scattered single pixels: equal-sized islands, the first ones on odd rows
        h, w = (int(v) for v in rng.integers(2, 30, 2))
        m = rng.random((h, w)) < 0.15
        m &= ndimage.convolve(m.astype(int), np.ones((3, 3), int), mode="constant") == 1  # isolated
        cases.append(m)
    compared = 0
    for m in cases:
        for mode in ("holes", "islands"):
            for area in (1, 3, 5, 20, 100):
                ours, changed = remove_small_regions(m, area, mode)
                ref, ref_changed = _cv2_remove_small_regions(m, area, mode)
                assert changed == ref_changed, (mode, area)
                np.testing.assert_array_equal(ours, ref)
                compared += changed
    assert compared > 1000


def test_mask_nms_groups_duplicates_under_the_best():
    a = np.zeros((10, 10), bool); a[0:10, 0:5] = True  # 50 px
    b = np.zeros((10, 10), bool); b[0:10, 0:4] = True  # IoU(a,b) = 40/50 = 0.8
    c = np.zeros((10, 10), bool); c[0:10, 6:10] = True  # disjoint
    groups = mask_nms([encode_rle(x) for x in (a, b, c)], [0.5, 0.9, 0.7], iou_threshold=0.7)
    assert groups == [[1, 0], [2]]
    assert mask_nms([encode_rle(x) for x in (a, b, c)], [0.5, 0.9, 0.7], iou_threshold=0.85) == [[1], [2], [0]]


def test_patch_weights_are_area_fractions():
    m = np.zeros((4, 6), bool)
    m[0:2, 0:3] = True  # exactly patch (0, 0) of a 2x2 grid of 2x3 patches
    m[2, 3] = True  # one pixel of patch (1, 1)
    w = patch_weights(m, (2, 2))
    assert np.allclose(w, [[1.0, 0.0], [0.0, 1 / 6]])
    with pytest.raises(ValueError):
        patch_weights(m, (3, 4))
