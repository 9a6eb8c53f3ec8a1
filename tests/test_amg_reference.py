"""Both automatic-mask engines against segment-anything's own ``SamAutomaticMaskGenerator`` — with its
OpenCV ``min_mask_region_area`` post-processing — mask for mask, in float32 on CPU.

The SAM is the tiny one with weights edited (tests/amg_stress.py) so that SAM's default thresholds
(IoU 0.88, stability 0.95, NMS 0.7) keep 24–68 masks per image; masks are paired by Hungarian
matching on mask IoU and must be RLE-equal, with the same scores, area and (COCO) box.

RLE equality holds on any CPU because both sides run the same float32 operations on the same shapes:
AutoSegmenter is segment-anything's own loop, and the batched engine runs here with segment-anything's
modules (``fast_decoder=False``) at its batch sizes (one image per encoder forward, ``points_per_batch``
prompts per decoder forward), so whichever kernels the CPU picks, it picks them for both. What is under
test is everything around the network: filters, NMS, crops, post-processing, boxes, RLE. The restructured
decoder's own arithmetic differs from segment-anything's in summation order; test_batched_amg.py checks it
against the float32 rounding band (amg_stress.compare_with_reference).
"""

from __future__ import annotations

import cv2  # noqa: F401  (dev extra: segment-anything's own min_mask_region_area needs OpenCV)
import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

from amg_stress import POINTS, hungarian, same_arithmetic, stress_images, stress_sam
from use_search.masks import encode_rle, rle_area, rle_bbox
from use_search.segmenter.automatic import AutoMaskParams, AutoSegmenter
from use_search.segmenter.batched import BatchedAutoSegmenter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MIN_AREA = 100  # changes masks of every image: holes filled, islands dropped, second NMS suppresses


@pytest.fixture(scope="module")
def sam():
    return stress_sam()


@pytest.fixture(scope="module")
def images():
    return stress_images()


_reference_cache: dict = {}


def reference(sam, image: np.ndarray, key: str, **kw) -> list[dict]:
    """segment-anything's records, untouched (its own OpenCV post-processing when min area > 0)."""
    if (key, id(image)) not in _reference_cache:
        gen = SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **kw)
        with torch.inference_mode():
            _reference_cache[key, id(image)] = gen.generate(image)
    return _reference_cache[key, id(image)]


def assert_same_masks(ref: list[dict], ours: list, exact_fields: bool = True) -> None:
    ref_rles = [encode_rle(r["segmentation"]) for r in ref]
    matched, ref_left, ours_left = hungarian(ref_rles, [s.rle for s in ours])
    assert (ref_left, ours_left) == (0, 0) and len(ours) == len(ref)
    assert (matched == 1.0).all(), np.sort(matched)[:5]
    by_rle = {s.rle["counts"]: s for s in ours}
    assert len(by_rle) == len(ours)
    for r, rle in zip(ref, ref_rles):
        s = by_rle[rle["counts"]]  # RLE-equal twin
        x, y, w, h = r["bbox"]  # segment-anything's box: w = x1 - x0 (ours is COCO's, one more)
        assert s.bbox == (x, y, w + 1, h + 1) == rle_bbox(s.rle)
        assert s.area == r["area"] == rle_area(s.rle) == int(s.mask.sum())
        assert s.source == "auto" and np.array_equal(s.mask, r["segmentation"])
        if exact_fields:
            assert s.predicted_iou == pytest.approx(r["predicted_iou"], abs=1e-6)
            assert s.stability_score == pytest.approx(r["stability_score"], abs=1e-6)
    assert [s.area for s in ours] == sorted((s.area for s in ours), reverse=True)


@pytest.mark.parametrize("min_area", [0, MIN_AREA])
def test_both_engines_equal_segment_anything(sam, images, min_area):
    params = AutoMaskParams(points_per_side=POINTS, min_mask_region_area=min_area)
    auto = AutoSegmenter(sam, params)
    batched = BatchedAutoSegmenter(sam, params, same_arithmetic(params))
    assert batched.exact and batched.dtype == torch.float32 and not batched.sdpa  # CPU: precision auto = exact
    ours_batched = batched.segment_batch(images)
    counts = []
    for image, ours in zip(images, ours_batched):
        ref = reference(sam, image, f"min{min_area}", points_per_side=POINTS, min_mask_region_area=min_area)
        counts.append(len(ref))
        assert_same_masks(ref, ours)
        if min_area:  # without it AutoSegmenter is segment-anything's output minus empty masks
            assert_same_masks(ref, auto.segment(image))
    # Many survivors per image, and the post-processing really removed some.
    assert all(20 <= n <= 68 for n in counts), counts
    if min_area:
        plain = [len(reference(sam, im, "min0", points_per_side=POINTS)) for im in images]
        assert all(n < p for n, p in zip(counts, plain)), (counts, plain)


def test_crop_layers_equal_segment_anything(sam, images):
    """crop_n_layers=1: the whole image and 4 overlapping crops, each encoded and prompted on its own."""
    kw = dict(points_per_side=POINTS, crop_n_layers=1, crop_n_points_downscale_factor=2, min_mask_region_area=MIN_AREA)
    image = images[0]
    ref = reference(sam, image, "crop1", **kw)
    crops_used = {tuple(r["crop_box"]) for r in ref}
    assert len(ref) >= 24 and len(crops_used) == 5, (len(ref), crops_used)
    params = AutoMaskParams(**kw)
    batched = BatchedAutoSegmenter(sam, params, same_arithmetic(params))
    assert_same_masks(ref, batched.segment(image))
    assert batched.counts["images"] == 1  # 5 crops, one image

