"""Batched automatic masks: segment-anything's ``SamAutomaticMaskGenerator`` rebuilt for throughput,
with the same output as ``AutoSegmenter`` (see automatic.py for the few deliberate differences from
segment-anything that both engines share).

What changes against the reference loop (one image or crop at a time, 64 prompts at a time):

- **Encoder**: many images (and crops) per forward; with ``fast`` precision scaled-dot-product
  attention, SAM's decomposed relative positions going in as the attention bias.
- **Decoder**: the whole point grid in large batches (SDPA with ``fast``). The first two-way layer's image-side
  projections are the same for every prompt (before the first image→token update all prompts see the
  same image tokens), so they are computed once per image, and the token→image attention of that layer
  is one attention with all prompts' tokens as queries. The two transposed convolutions of the
  upscaler (kernel = stride = 2) are per-pixel linear maps: they run as matmuls in token layout and
  only the 3-channel mask logits are rearranged to pixels. Only the three multimask outputs are
  computed.
- **Filtering** as the reference, in the same order (IoU > thresh, then upscale to the crop's size,
  stability ≥ thresh, boxes, crop-edge filter, box NMS per crop, NMS across crops preferring smaller
  crops), but full-size masks are not kept per candidate: after NMS the kept ones are upscaled again,
  so memory is bounded by a pixel budget, not by the candidate count.
- **RLE** on the device: run boundaries of all kept masks at once (one ``nonzero``), then COCO
  compression of the counts by pycocotools; no Python loop over pixels.

Precision (``AutoMaskParams.precision``, setting ``USE_SEARCH_AMG__PRECISION``): ``exact`` (the default
off CUDA) is float32 with segment-anything's explicit attention arithmetic. What differs is only the order
of float32 sums (the restructured decoder, other batch shapes, whichever GEMM and SIMD kernels the CPU
picks), so a mask pixel can differ from segment-anything's only where its logit lies within float32
rounding of ``mask_threshold``, and a candidate can pass or fail a filter the other way only where its
score lies that close to the threshold. The tests bound that band from the arithmetic (2·γ_N times the
logit's last sum in absolute values, tests/amg_stress.py) and check every pixel against it: on the tiny
SAM's 202 masks, 0 to 3 masks differ from segment-anything's, by one pixel each, depending on the CPU's
kernels. With segment-anything's modules at its batch sizes (``fast_decoder=False``, ``image_batch=1``,
``decode_batch=points_per_batch``) the arithmetic is the reference's operation for operation and the masks
are its masks RLE for RLE on any CPU; the tests check that with NMS, ``min_mask_region_area`` and a crop
layer. On CUDA the float32 kernels are the GPU's; its explicit attention also holds whole attention
matrices: lower ``image_batch`` on small GPUs. ``fast`` (the default on CUDA) runs encoder and decoder
in bfloat16, the mask upscaling in float16, and SDPA: logits move by bf16 rounding, so mask borders move
and close calls in the filters and in NMS go the other way. Forced on CPU with the stress-test SAM (three
photos of long side 160, a 12×12 grid, SAM's default thresholds; ``bench/bench_amg_precision.py``,
docs/benchmarks.md), per image the matched masks' median IoU was 0.81–1.00, the worst pair 0.015, and
0 to 5 masks per image had no twin. That is a measurement on those photos, not a bound: other photos and
settings leave more masks without a twin. The bf16 encoder/decoder is nearly all of it.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
)

from use_search.masks import encode_rle, mask_bbox
from use_search.segmenter.amg import ResizeToEncoder, box_nms, postprocess_small_regions
from use_search.segmenter.kernels import fast_mask_decoder, rle_encode_batch, vit_attention_sdpa
from use_search.config import AutoMaskParams
from use_search.types import Segment


@dataclass(frozen=True)
class BatchOptions:
    """Throughput knobs. ``dtype``, ``upscale_dtype`` and ``sdpa`` change float rounding, so masks by
    a pixel here and there; their defaults follow ``AutoMaskParams.precision``."""

    image_batch: int = 0  # images (crops) per encoder forward; 0: 8 on CUDA, 1 elsewhere (host RAM)
    decode_batch: int = 0  # point prompts per decoder forward; 0: 1024 on CUDA, 128 elsewhere
    # "auto": bfloat16 on CUDA unless precision is exact, else float32; or "float32", "bfloat16", "float16"
    dtype: str = "auto"
    upscale_dtype: str = "auto"  # mask-logit upscaling; "auto": float16 on CUDA unless precision is exact
    pixel_budget: int = 0  # full-size mask elements held at once; 0: 2**28 on CUDA, 2**25 elsewhere
    # scaled_dot_product_attention in encoder and decoder; None: unless precision is exact (SDPA's
    # rounding differs from segment-anything's explicit softmax(q·kᵀ/√d)·v)
    sdpa: bool | None = None
    fast_decoder: bool = True  # the restructured decoder above; False runs segment-anything's module
    compile: bool = False  # torch.compile encoder and decoder (CUDA; first batches pay the compile)
    preprocess_threads: int = 4  # PIL resizes in parallel (PIL releases the GIL)
    profile: bool = False  # synchronise at stage ends so ``stage_seconds`` is exact (CUDA)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(name: str, device: torch.device, fast: torch.dtype, exact: bool) -> torch.dtype:
    if name == "auto":
        return fast if device.type == "cuda" and not exact else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}") from None


@dataclass
class _Crop:
    """One crop of one image (the whole image is crop 0), resized for the encoder: uint8 3×h×w
    (long side = encoder size), its size, and where it lies in the image (XYXY, end exclusive)."""

    tensor: torch.Tensor
    orig_size: tuple[int, int]  # the crop's size, (H, W)
    input_size: tuple[int, int]
    box: list[int]
    layer: int


@dataclass
class _Kept:
    """Masks of one crop that survived its filters and NMS: low-res logits, scores, boxes (XYXY in the
    image, inclusive ends)."""

    crop: _Crop
    low: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    boxes: torch.Tensor


class BatchedAutoSegmenter:
    """``segment(image)`` / ``segment_batch(images)`` → ``Segment``s, largest first, like ``AutoSegmenter``.

    Crop layers (``crop_n_layers > 0``) as segment-anything: crop boxes per layer, each crop encoded
    on its own (batched with the others), its own point grid, masks touching a crop edge (not an image
    edge) dropped, NMS per crop, then NMS across crops preferring masks from smaller crops. ``sam`` is
    not modified; when the dtype differs from the model's, a converted copy of its modules is kept.
    """

    def __init__(self, sam: Sam, params: AutoMaskParams, options: BatchOptions | None = None) -> None:
        self.params = params
        self.options = options or BatchOptions()
        self.sam = sam
        self.device = next(sam.parameters()).device
        self.exact = params.precision == "exact" or (params.precision == "auto" and self.device.type != "cuda")
        self.dtype = _resolve_dtype(self.options.dtype, self.device, torch.bfloat16, self.exact)
        self.upscale_dtype = _resolve_dtype(self.options.upscale_dtype, self.device, torch.float16, self.exact)
        self.sdpa = (not self.exact) if self.options.sdpa is None else self.options.sdpa
        cuda = self.device.type == "cuda"
        self.pixel_budget = self.options.pixel_budget or (2**28 if cuda else 2**25)
        self.image_batch = self.options.image_batch or (8 if cuda else 1)
        self.decode_batch = self.options.decode_batch or (1024 if cuda else 128)
        model_dtype = next(sam.parameters()).dtype
        if self.dtype != model_dtype:
            self.encoder = copy.deepcopy(sam.image_encoder).to(self.dtype).eval()
            self.decoder = copy.deepcopy(sam.mask_decoder).to(self.dtype).eval()
        else:
            self.encoder, self.decoder = sam.image_encoder, sam.mask_decoder
        self.prompt_encoder = sam.prompt_encoder  # tiny; kept in the model's dtype, outputs cast
        self.img_size = sam.image_encoder.img_size
        self.input_size: int | None = int(self.img_size)  # the Segmenter protocol's name for it
        self.mask_threshold = float(sam.mask_threshold)
        self.transform = ResizeToEncoder(self.img_size)
        # One grid per crop layer, (n², 2) in [0, 1], x then y.
        self.grids = build_all_layer_point_grids(
            params.points_per_side, params.crop_n_layers, params.crop_n_points_downscale_factor
        )
        self._pixel_mean = sam.pixel_mean.to(self.device).float()
        self._pixel_std = sam.pixel_std.to(self.device).float()
        self._prompt_cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._encode = self._encode_impl
        self._decode = self._decode_impl
        if self.options.compile:
            self._encode = torch.compile(self._encode_impl, dynamic=False)
            self._decode = torch.compile(self._decode_impl, dynamic=False)
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    # Public API ----------------------------------------------------------------------------------
    def segment(self, image: np.ndarray) -> list[Segment]:
        return self.segment_batch([image])[0]

    @torch.inference_mode()
    def segment_batch(self, images: Sequence[np.ndarray]) -> list[list[Segment]]:
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an H×W×3 uint8 RGB image, got {image.shape} {image.dtype}")
        p = self.params
        # Every crop of every image, in segment-anything's order (the whole image first), but not the
        # crops of an image a few pixels wide that hold no pixels or repeat an earlier crop (as AutoSegmenter).
        jobs = []
        for i, image in enumerate(images):
            seen: set[tuple[int, ...]] = set()
            for box, layer in zip(*generate_crop_boxes(image.shape[:2], p.crop_n_layers, p.crop_overlap_ratio)):
                if box[2] > box[0] and box[3] > box[1] and tuple(box) not in seen:
                    seen.add(tuple(box))
                    jobs.append((i, box, layer))
        last_job = {i: g for g, (i, _, _) in enumerate(jobs)}
        kept: list[list[_Kept]] = [[] for _ in images]
        out: list[list[Segment]] = [[] for _ in images]
        step = self.image_batch
        for start in range(0, len(jobs), step):
            chunk = jobs[start : start + step]
            with self._stage("preprocess"):
                crops = self.prepare([images[i] for i, _, _ in chunk], [(box, layer) for _, box, layer in chunk])
            with self._stage("encoder"):
                features = self.embed_images(crops)
            for g, (i, _, _), crop, feat in zip(range(start, start + len(chunk)), chunk, crops, features):
                kept[i].append(self.crop_masks(crop, feat[None], images[i].shape[:2]))
                if g == last_job[i]:  # the image's last crop: merge, and free its crops' masks
                    out[i] = self.merge_crops(kept[i], images[i].shape[:2])
                    kept[i] = []
                    self.counts["images"] += 1
        return out

    def reset_stats(self) -> None:
        self.stage_seconds.clear()
        self.counts.clear()

    # Stage 1: crop and resize (CPU) ----------------------------------------------------------------
    def prepare(
        self, images: Sequence[np.ndarray], crops: Sequence[tuple[list[int], int]] | None = None
    ) -> list[_Crop]:
        """Crop, then resize the long side to the encoder size as ``SamPredictor.set_image`` does (PIL)."""
        if crops is None:
            crops = [([0, 0, im.shape[1], im.shape[0]], 0) for im in images]

        def one(image: np.ndarray, box: list[int], layer: int) -> _Crop:
            x0, y0, x1, y1 = box
            cropped = image[y0:y1, x0:x1]
            resized = self.transform.apply_image(cropped)
            t = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)
            return _Crop(t, cropped.shape[:2], resized.shape[:2], list(box), layer)

        args = [(im, box, layer) for im, (box, layer) in zip(images, crops)]
        threads = min(self.options.preprocess_threads, len(args))
        if threads <= 1:
            return [one(*a) for a in args]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda a: one(*a), args))

    # Stage 2: image encoder ------------------------------------------------------------------------
    def embed_images(self, crops: Sequence[_Crop]) -> torch.Tensor:
        """(B, 256, h, w) image embeddings in ``self.dtype``: normalise, pad, one encoder forward."""
        s = self.img_size
        batch = torch.zeros(len(crops), 3, s, s, device=self.device, dtype=torch.float32)
        for i, c in enumerate(crops):
            x = c.tensor.to(self.device, non_blocking=True).float()
            h, w = c.input_size
            batch[i, :, :h, :w] = (x - self._pixel_mean) / self._pixel_std
        return self._encode(batch.to(self.dtype))

    def _encode_impl(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        if not self.sdpa:
            return enc(x)
        x = enc.patch_embed(x)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for blk in enc.blocks:
            shortcut = x
            x = blk.norm1(x)
            if blk.window_size > 0:
                H, W = x.shape[1], x.shape[2]
                x, pad_hw = window_partition(x, blk.window_size)
            x = vit_attention_sdpa(blk.attn, x)
            if blk.window_size > 0:
                x = window_unpartition(x, blk.window_size, pad_hw, (H, W))
            x = shortcut + x
            x = x + blk.mlp(blk.norm2(x))
        return enc.neck(x.permute(0, 3, 1, 2))

    # Stage 3: prompts → candidates → filters → NMS, per crop ---------------------------------------
    def crop_masks(self, crop: _Crop, feat: torch.Tensor, image_size: tuple[int, int]) -> _Kept:
        """segment-anything's ``_process_crop``: every prompt of the crop's grid, filters, NMS."""
        p = self.params
        crop_h, crop_w = crop.orig_size
        # The reference's order: prompts in grid order, three masks each (prompt-major).
        with self._stage("decoder"):
            low_res, iou = [], []
            sparse_all, dense = self._prompts(crop)
            for start in range(0, sparse_all.shape[0], self.decode_batch):
                sparse = sparse_all[start : start + self.decode_batch]
                masks, preds = self._decode(feat, sparse, dense)
                low_res.append(masks.flatten(0, 1))
                iou.append(preds.flatten(0, 1).float())
            low = torch.cat(low_res)
            iou_preds = torch.cat(iou)
        with self._stage("filter"):
            idx = torch.arange(low.shape[0], device=low.device)
            if p.pred_iou_thresh > 0.0:
                idx = idx[iou_preds > p.pred_iou_thresh]
            stability, boxes, nonempty = [], [], []
            for chunk in self._chunks(idx, crop_h * crop_w):
                up = self._upscale(low[chunk], crop)
                stability.append(calculate_stability_score(up, self.mask_threshold, p.stability_score_offset))
                binary = up > self.mask_threshold
                boxes.append(batched_mask_to_box(binary))
                nonempty.append(binary.flatten(1).any(1))
            if stability:
                stab, box, keep = torch.cat(stability), torch.cat(boxes), torch.cat(nonempty)
            else:
                stab = torch.zeros(0, device=low.device)
                box = torch.zeros(0, 4, device=low.device, dtype=torch.long)
                keep = torch.zeros(0, device=low.device, dtype=torch.bool)
            if p.stability_score_thresh > 0.0:
                keep &= stab >= p.stability_score_thresh
            # Masks near a crop edge that is not an image edge (a no-op for the whole image). Empty
            # masks are dropped here: segment-anything keeps them, but they take part in no NMS.
            keep &= ~is_box_near_crop_edge(box, crop.box, [0, 0, image_size[1], image_size[0]])
            idx, stab, box = idx[keep], stab[keep], box[keep]
        self.counts["candidates"] += int(idx.numel())
        with self._stage("nms"):
            scores = iou_preds[idx]
            keep = box_nms(box, scores, p.box_nms_thresh)
            offset = torch.tensor([crop.box[0], crop.box[1], crop.box[0], crop.box[1]], device=box.device)
            return _Kept(crop, low[idx[keep]], scores[keep], stab[keep], box[keep] + offset)

    def _prompts(self, crop: _Crop) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (n², 2, 256) point embeddings and the (1, 256, h, w) dense no-mask embedding for a
        crop of this size and layer, computed as ``SamAutomaticMaskGenerator._process_batch`` does."""
        key = (crop.layer, *crop.orig_size)
        cached = self._prompt_cache.get(key)
        if cached is not None:
            return cached
        points = self.grids[crop.layer] * np.array(crop.orig_size)[None, ::-1]
        coords = self.transform.apply_coords(points, crop.orig_size)  # float64, as the reference
        in_points = torch.as_tensor(coords, device=self.device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=self.device)
        # In the reference's batches of points_per_batch: the same shapes, so the same kernels.
        step = self.params.points_per_batch
        parts = [
            self.prompt_encoder(points=(in_points[i : i + step, None, :], in_labels[i : i + step, None]), boxes=None, masks=None)
            for i in range(0, in_points.shape[0], step)
        ]
        sparse, dense = torch.cat([sp for sp, _ in parts]), parts[0][1]
        cached = (sparse.to(self.dtype), dense[:1].to(self.dtype))
        if len(self._prompt_cache) > 64:
            self._prompt_cache.clear()
        self._prompt_cache[key] = cached
        return cached

    def _decode_impl(
        self, feat: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 3, 4h, 4w) low-res mask logits and (n, 3) predicted IoUs for n point prompts."""
        image_pe = self.prompt_encoder.get_dense_pe().to(self.dtype)
        dec = self.decoder
        if not self.options.fast_decoder:
            return dec(feat, image_pe, sparse, dense.expand(sparse.shape[0], -1, -1, -1), multimask_output=True)
        return fast_mask_decoder(dec, feat, image_pe, sparse, dense, self.sdpa)

    def _chunks(self, idx: torch.Tensor, pixels: int) -> Iterator[torch.Tensor]:
        step = max(1, self.pixel_budget // max(1, pixels))
        for start in range(0, idx.numel(), step):
            yield idx[start : start + step]

    def _upscale(self, low: torch.Tensor, crop: _Crop) -> torch.Tensor:
        """``Sam.postprocess_masks`` for (c, h, w) logits → (c, H, W) at the crop's size."""
        x = low[:, None].to(self.upscale_dtype)
        x = F.interpolate(x, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = x[..., : crop.input_size[0], : crop.input_size[1]]
        x = F.interpolate(x, crop.orig_size, mode="bilinear", align_corners=False)
        return x[:, 0]

    # Stage 4: across crops → full-size masks → segments, per image ---------------------------------
    def merge_crops(self, kept: list[_Kept], image_size: tuple[int, int]) -> list[Segment]:
        """NMS across crops (segment-anything's ``_generate_masks``), then the kept masks at full size,
        ``min_mask_region_area`` post-processing, RLE."""
        p = self.params
        with self._stage("nms"):
            # Positions in the concatenation (crop-major, each crop in its NMS order) as the reference.
            owner = torch.cat([torch.full((len(k.iou),), c, dtype=torch.long) for c, k in enumerate(kept)])
            pos = torch.cat([torch.arange(len(k.iou)) for k in kept])
            if p.crop_n_layers > 0 and len(owner):  # segment-anything: whenever there are crop layers
                boxes = torch.cat([k.boxes for k in kept])
                crop_boxes = torch.tensor([kept[c].crop.box for c in owner.tolist()])
                area = (crop_boxes[:, 2] - crop_boxes[:, 0]) * (crop_boxes[:, 3] - crop_boxes[:, 1])
                order = box_nms(boxes, (1 / area).to(boxes.device), p.crop_nms_thresh).cpu()
                owner, pos = owner[order], pos[order]
        with self._stage("masks"):
            segments = self._segments(kept, owner.tolist(), pos.tolist(), image_size)
        self.counts["masks"] += len(segments)
        return segments

    def _segments(
        self, kept: list[_Kept], owner: list[int], pos: list[int], image_size: tuple[int, int]
    ) -> list[Segment]:
        h, w = image_size
        n = len(owner)
        masks: list[np.ndarray] = [np.zeros(0, bool)] * n
        rles: list[dict[str, Any]] = [{}] * n
        areas = [0] * n
        clean = self.params.min_mask_region_area > 0
        for c, k in enumerate(kept):
            mine = [j for j in range(n) if owner[j] == c]
            if not mine:
                continue
            x0, y0, x1, y1 = k.crop.box
            where = torch.tensor([pos[j] for j in mine], device=k.low.device)
            for chunk in self._chunks(torch.arange(len(mine), device=where.device), h * w):
                binary = self._upscale(k.low[where[chunk]], k.crop) > self.mask_threshold
                binary = F.pad(binary, (x0, w - x1, y0, h - y1), value=False)  # segment-anything's uncrop_masks
                chunk_rles = [{}] * len(chunk) if clean else rle_encode_batch(binary)
                chunk_areas = binary.sum(dim=(1, 2)).tolist()
                for j, m, r, a in zip((mine[i] for i in chunk.tolist()), binary.cpu().numpy(), chunk_rles, chunk_areas):
                    masks[j], rles[j], areas[j] = m, r, a
        order = list(range(n))
        if clean:
            p = self.params
            order, masks = postprocess_small_regions(masks, p.min_mask_region_area, p.post_nms_thresh)
        out: list[Segment] = []
        for j in order:
            k, i = kept[owner[j]], pos[j]
            mask = masks[j]
            if clean:
                seg = Segment(mask=mask, bbox=mask_bbox(mask), area=int(mask.sum()), rle=encode_rle(mask))
            else:
                bx0, by0, bx1, by1 = (int(v) for v in k.boxes[i].tolist())
                seg = Segment(mask=mask, bbox=(bx0, by0, bx1 - bx0 + 1, by1 - by0 + 1), area=areas[j], rle=rles[j])
            seg.predicted_iou = float(k.iou[i])
            seg.stability_score = float(k.stability[i])
            seg.source = "auto"
            out.append(seg)
        out.sort(key=lambda s: -s.area)
        return out

    # Timing --------------------------------------------------------------------------------------
    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        if self.options.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.options.profile and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stage_seconds[name] += time.perf_counter() - t0

