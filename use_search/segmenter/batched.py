"""Batched automatic masks: segment-anything's ``SamAutomaticMaskGenerator`` (``crop_n_layers=0``),
rebuilt for throughput, with the same output as ``AutoSegmenter``.

What changes against the reference loop (one image, 64 prompts at a time, every step in fp32):

- **Encoder**: many images per forward, in the model dtype of choice (bf16 on CUDA) with
  scaled-dot-product attention; SAM's decomposed relative positions go in as the attention bias.
- **Decoder**: the whole point grid in large batches, bf16 on CUDA, SDPA. The first two-way layer's
  image-side projections are the same for every prompt (before the first image→token update all
  prompts see the same image tokens), so they are computed once per image, and the token→image
  attention of that layer is one attention with all prompts' tokens as queries. The two transposed
  convolutions of the upscaler (kernel = stride = 2) are per-pixel linear maps: they run as matmuls in
  token layout and only the 3-channel mask logits are rearranged to pixels. Only the three multimask
  outputs are computed.
- **Filtering** as the reference, in the same order (IoU > thresh, then upscale to the original
  size, stability ≥ thresh, boxes, box NMS with ``torchvision.ops.batched_nms``), but full-size masks
  are not kept per candidate: after NMS the kept ones are upscaled again, so memory is bounded by a
  pixel budget, not by the candidate count.
- **RLE** on the device: run boundaries of all kept masks at once (one ``nonzero``), then COCO
  compression of the counts by pycocotools; no Python loop over pixels.

Ordering, fields and ``min_mask_region_area`` post-processing are those of ``AutoSegmenter``
(largest area first; bbox XYWH tight around the mask; ``source="auto"``).
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import get_rel_pos, window_partition, window_unpartition
from segment_anything.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import batched_nms

from use_search.masks import clean_mask, encode_rle, mask_bbox
from use_search.segmenter.automatic import AutoMaskParams
from use_search.types import Segment


@dataclass(frozen=True)
class BatchOptions:
    """Throughput knobs; none of them changes which masks come out (up to float rounding)."""

    image_batch: int = 0  # images per encoder forward; 0: 8 on CUDA, 1 elsewhere (host RAM)
    decode_batch: int = 0  # point prompts per decoder forward; 0: 1024 on CUDA, 128 elsewhere
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 elsewhere; or "float32", "bfloat16", "float16"
    upscale_dtype: str = "auto"  # mask-logit upscaling: "auto": float16 on CUDA, float32 elsewhere
    pixel_budget: int = 0  # full-size mask elements held at once; 0: 2**28 on CUDA, 2**25 elsewhere
    sdpa: bool = True  # scaled_dot_product_attention in encoder and decoder
    fast_decoder: bool = True  # the restructured decoder above; False runs segment-anything's module
    compile: bool = False  # torch.compile encoder and decoder (CUDA; first batches pay the compile)
    preprocess_threads: int = 4  # PIL resizes in parallel (PIL releases the GIL)
    profile: bool = False  # synchronise at stage ends so ``stage_seconds`` is exact (CUDA)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(name: str, device: torch.device, cuda_default: torch.dtype) -> torch.dtype:
    if name == "auto":
        return cuda_default if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}") from None


@dataclass
class _Prepared:
    """One image resized for the encoder: uint8 3×h×w (long side = encoder size), and its sizes."""

    tensor: torch.Tensor
    orig_size: tuple[int, int]
    input_size: tuple[int, int]


class BatchedAutoSegmenter:
    """``segment(image)`` / ``segment_batch(images)`` → ``Segment``s, largest first, like ``AutoSegmenter``.

    Only ``crop_n_layers=0`` (the whole image, no crop layers) is implemented: with it the reference's
    crop-edge filter is a no-op and no cross-crop NMS runs. ``sam`` is not modified; when ``dtype``
    differs from the model's, a converted copy of its modules is kept.
    """

    def __init__(self, sam: Sam, params: AutoMaskParams, options: BatchOptions | None = None) -> None:
        if params.crop_n_layers != 0:
            raise ValueError(
                "BatchedAutoSegmenter implements crop_n_layers=0 only; use AutoSegmenter for crop layers"
            )
        if params.points_per_side is None or params.points_per_side <= 0:
            raise ValueError("points_per_side must be a positive integer")
        self.params = params
        self.options = options or BatchOptions()
        self.sam = sam
        self.device = next(sam.parameters()).device
        self.dtype = _resolve_dtype(self.options.dtype, self.device, torch.bfloat16)
        self.upscale_dtype = _resolve_dtype(self.options.upscale_dtype, self.device, torch.float16)
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
        self.mask_threshold = float(sam.mask_threshold)
        self.transform = ResizeLongestSide(self.img_size)
        self.grid = build_point_grid(params.points_per_side)  # (n², 2) in [0, 1], x then y
        self._pixel_mean = sam.pixel_mean.to(self.device).float()
        self._pixel_std = sam.pixel_std.to(self.device).float()
        self._prompt_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
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
        out: list[list[Segment]] = []
        step = self.image_batch
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            with self._stage("preprocess"):
                prepared = self.prepare(chunk)
            with self._stage("encoder"):
                features = self.embed_images(prepared)
            for prep, feat in zip(prepared, features):
                out.append(self.masks_for(prep, feat[None]))
            self.counts["images"] += len(chunk)
        return out

    def reset_stats(self) -> None:
        self.stage_seconds.clear()
        self.counts.clear()

    # Stage 1: resize (CPU) -------------------------------------------------------------------------
    def prepare(self, images: Sequence[np.ndarray]) -> list[_Prepared]:
        """Resize the long side to the encoder size exactly as ``SamPredictor.set_image`` does (PIL)."""

        def one(image: np.ndarray) -> _Prepared:
            resized = self.transform.apply_image(image)
            t = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)
            return _Prepared(t, (image.shape[0], image.shape[1]), (resized.shape[0], resized.shape[1]))

        threads = min(self.options.preprocess_threads, len(images))
        if threads <= 1:
            return [one(im) for im in images]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, images))

    # Stage 2: image encoder ------------------------------------------------------------------------
    def embed_images(self, prepared: Sequence[_Prepared]) -> torch.Tensor:
        """(B, 256, h, w) image embeddings in ``self.dtype``: normalise, pad, one encoder forward."""
        s = self.img_size
        batch = torch.zeros(len(prepared), 3, s, s, device=self.device, dtype=torch.float32)
        for i, p in enumerate(prepared):
            x = p.tensor.to(self.device, non_blocking=True).float()
            h, w = p.input_size
            batch[i, :, :h, :w] = (x - self._pixel_mean) / self._pixel_std
        return self._encode(batch.to(self.dtype))

    def _encode_impl(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        if not self.options.sdpa:
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
            x = _vit_attention_sdpa(blk.attn, x)
            if blk.window_size > 0:
                x = window_unpartition(x, blk.window_size, pad_hw, (H, W))
            x = shortcut + x
            x = x + blk.mlp(blk.norm2(x))
        return enc.neck(x.permute(0, 3, 1, 2))

    # Stage 3: prompts → candidates → NMS → segments, per image -----------------------------------
    def masks_for(self, prep: _Prepared, feat: torch.Tensor) -> list[Segment]:
        p = self.params
        orig_h, orig_w = prep.orig_size
        # The reference's order: prompts in grid order, three masks each (prompt-major).
        with self._stage("decoder"):
            low_res, iou = [], []
            sparse_all, dense = self._prompts(prep.orig_size)
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
            stability, boxes = [], []
            for chunk in self._chunks(idx, orig_h * orig_w):
                up = self._upscale(low[chunk], prep)
                stability.append(calculate_stability_score(up, self.mask_threshold, p.stability_score_offset))
                boxes.append(batched_mask_to_box(up > self.mask_threshold))
            if stability:
                stab = torch.cat(stability)
                box = torch.cat(boxes)
            else:
                stab = torch.zeros(0, device=low.device)
                box = torch.zeros(0, 4, device=low.device, dtype=torch.long)
            if p.stability_score_thresh > 0.0:
                keep = stab >= p.stability_score_thresh
                idx, stab, box = idx[keep], stab[keep], box[keep]
        self.counts["candidates"] += int(idx.numel())
        with self._stage("nms"):
            scores = iou_preds[idx]
            keep = batched_nms(
                box.float(), scores, torch.zeros(len(box), device=box.device), iou_threshold=p.box_nms_thresh
            )
            idx, stab, box, scores = idx[keep], stab[keep], box[keep], scores[keep]
        with self._stage("masks"):
            segments = self._segments(low, idx, stab, box, scores, prep)
        self.counts["masks"] += len(segments)
        return segments

    def _prompts(self, orig_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (n², 2, 256) point embeddings and the (1, 256, h, w) dense no-mask embedding for an
        image of this size, computed as ``SamAutomaticMaskGenerator._process_batch`` does."""
        cached = self._prompt_cache.get(orig_size)
        if cached is not None:
            return cached
        points = self.grid * np.array(orig_size)[None, ::-1]
        coords = self.transform.apply_coords(points, orig_size)  # float64, as the reference
        in_points = torch.as_tensor(coords, device=self.device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=self.device)
        sparse, dense = self.prompt_encoder(points=(in_points[:, None, :], in_labels[:, None]), boxes=None, masks=None)
        cached = (sparse.to(self.dtype), dense[:1].to(self.dtype))
        if len(self._prompt_cache) > 64:
            self._prompt_cache.clear()
        self._prompt_cache[orig_size] = cached
        return cached

    def _decode_impl(
        self, feat: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 3, 4h, 4w) low-res mask logits and (n, 3) predicted IoUs for n point prompts."""
        image_pe = self.prompt_encoder.get_dense_pe().to(self.dtype)
        dec = self.decoder
        if not self.options.fast_decoder:
            return dec(feat, image_pe, sparse, dense.expand(sparse.shape[0], -1, -1, -1), multimask_output=True)
        return _fast_mask_decoder(dec, feat, image_pe, sparse, dense, self.options.sdpa)

    def _chunks(self, idx: torch.Tensor, pixels: int) -> Iterator[torch.Tensor]:
        step = max(1, self.pixel_budget // max(1, pixels))
        for start in range(0, idx.numel(), step):
            yield idx[start : start + step]

    def _upscale(self, low: torch.Tensor, prep: _Prepared) -> torch.Tensor:
        """``Sam.postprocess_masks`` for (c, h, w) logits → (c, H, W) at the original size."""
        x = low[:, None].to(self.upscale_dtype)
        x = F.interpolate(x, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = x[..., : prep.input_size[0], : prep.input_size[1]]
        x = F.interpolate(x, prep.orig_size, mode="bilinear", align_corners=False)
        return x[:, 0]

    def _segments(
        self,
        low: torch.Tensor,
        idx: torch.Tensor,
        stab: torch.Tensor,
        box: torch.Tensor,
        scores: torch.Tensor,
        prep: _Prepared,
    ) -> list[Segment]:
        h, w = prep.orig_size
        masks_np, rles, areas = [], [], []
        for chunk_pos in self._chunks(torch.arange(idx.numel(), device=idx.device), h * w):
            binary = self._upscale(low[idx[chunk_pos]], prep) > self.mask_threshold
            areas.append(binary.sum(dim=(1, 2)))
            rles.extend(rle_encode_batch(binary))
            masks_np.append(binary.cpu().numpy())
        if not masks_np:
            return []
        masks = np.concatenate(masks_np) if len(masks_np) > 1 else masks_np[0]
        area = torch.cat(areas).cpu().numpy()
        box_np = box.cpu().numpy()
        iou_np = scores.float().cpu().numpy()
        stab_np = stab.float().cpu().numpy()
        out: list[Segment] = []
        for i in range(len(masks)):
            mask = masks[i]
            if self.params.min_mask_region_area > 0:
                mask = clean_mask(mask, self.params.min_mask_region_area, self.params.min_mask_region_area)
                a = int(mask.sum())
                if a == 0:
                    continue
                seg = Segment(mask=mask, bbox=mask_bbox(mask), area=a, rle=encode_rle(mask))
            else:
                a = int(area[i])
                if a == 0:
                    continue
                x0, y0, x1, y1 = (int(v) for v in box_np[i])
                seg = Segment(mask=mask, bbox=(x0, y0, x1 - x0 + 1, y1 - y0 + 1), area=a, rle=rles[i])
            seg.predicted_iou = float(iou_np[i])
            seg.stability_score = float(stab_np[i])
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


# ---------------------------------------------------------------------------------------------------
# RLE on the device
# ---------------------------------------------------------------------------------------------------
def rle_encode_batch(masks: torch.Tensor) -> list[dict[str, Any]]:
    """(n, H, W) bool masks → COCO compressed RLEs (``counts`` as str), as ``masks.encode_rle`` gives.

    Run boundaries of all masks come from one ``nonzero`` over the column-major flattening on the
    masks' device; only those boundaries travel to the host, where pycocotools compresses the counts.
    """
    n, h, w = masks.shape
    if n == 0:
        return []
    flat = masks.transpose(1, 2).reshape(n, h * w)
    which, pos = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)
    which_np = which.cpu().numpy()
    ends = (pos + 1).cpu().numpy().astype(np.int64)
    first = flat[:, 0].cpu().numpy()
    bounds = np.searchsorted(which_np, np.arange(n + 1))
    total = np.array([h * w], dtype=np.int64)
    zero = np.zeros(1, dtype=np.int64)
    uncompressed = []
    for i in range(n):
        edges = np.concatenate([zero, ends[bounds[i] : bounds[i + 1]], total])
        counts = np.diff(edges)
        if first[i]:  # COCO runs start with a (possibly empty) run of zeros
            counts = np.concatenate([zero, counts])
        uncompressed.append({"size": [h, w], "counts": counts.astype(np.uint32)})
    coco = mask_utils.frPyObjects(uncompressed, h, w)
    return [{"size": [h, w], "counts": r["counts"].decode("ascii")} for r in coco]


# ---------------------------------------------------------------------------------------------------
# Encoder attention with SDPA
# ---------------------------------------------------------------------------------------------------
def _vit_attention_sdpa(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``image_encoder.Attention.forward`` with ``scaled_dot_product_attention``;
    the decomposed relative-position terms (computed from the unscaled q, as there) are the bias."""
    B, H, W, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, HW, hd)
    bias = None
    if attn.use_rel_pos:
        Rh = get_rel_pos(H, H, attn.rel_pos_h).to(q.dtype)
        Rw = get_rel_pos(W, W, attn.rel_pos_w).to(q.dtype)
        r_q = q.reshape(B, heads, H, W, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)
        bias = (rel_h[:, :, :, :, :, None] + rel_w[:, :, :, :, None, :]).reshape(B, heads, H * W, H * W)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.view(B, heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return attn.proj(out)


# ---------------------------------------------------------------------------------------------------
# Mask decoder, restructured
# ---------------------------------------------------------------------------------------------------
def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, c = x.shape
    return x.reshape(b, t, n, c // n).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, n, t, c = x.shape
    return x.transpose(1, 2).reshape(b, t, n * c)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sdpa: bool) -> torch.Tensor:
    if sdpa:
        return F.scaled_dot_product_attention(q, k, v)
    attn = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return attn @ v


def _two_way_attention(
    layer: torch.nn.Module, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor, sdpa: bool
) -> torch.Tensor:
    """``transformer.Attention.forward`` where q, k, v may have batch 1 (shared by all prompts)."""
    n = layer.num_heads
    q = _heads(layer.q_proj(q_in), n)
    k = _heads(layer.k_proj(k_in), n)
    v = _heads(layer.v_proj(v_in), n)
    if k.shape[0] == 1 and q.shape[0] > 1:
        # Same keys for every prompt: one attention with all prompts' queries stacked.
        b, hn, t, c = q.shape
        out = _attend(q.transpose(0, 1).reshape(1, hn, b * t, c), k, v, sdpa)
        out = out.reshape(hn, b, t, c).transpose(0, 1)
    else:
        if q.shape[0] != k.shape[0]:
            q = q.expand(k.shape[0], -1, -1, -1)
        out = _attend(q, k, v, sdpa)
    return layer.out_proj(_merge(out))


def _fast_mask_decoder(
    dec: torch.nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    sdpa: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.forward(..., multimask_output=True)`` for n prompts on one image.

    ``dense`` is the (1, C, h, w) no-mask embedding shared by every point prompt. Returns (n, 3, 4h, 4w)
    logits and (n, 3) IoU predictions.
    """
    n = sparse.shape[0]
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0).to(sparse.dtype)
    tokens = torch.cat([out_tokens[None].expand(n, -1, -1), sparse], dim=1)
    _, c, h, w = image_embeddings.shape
    keys = (image_embeddings + dense).flatten(2).permute(0, 2, 1)  # (1, hw, C): shared until layer 1 ends
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    tr = dec.transformer
    queries, query_pe = tokens, tokens
    for layer in tr.layers:
        if layer.skip_first_layer_pe:
            queries = _two_way_attention(layer.self_attn, queries, queries, queries, sdpa)
        else:
            q = queries + query_pe
            queries = queries + _two_way_attention(layer.self_attn, q, q, queries, sdpa)
        queries = layer.norm1(queries)
        q = queries + query_pe
        k = keys + key_pe
        queries = layer.norm2(queries + _two_way_attention(layer.cross_attn_token_to_image, q, k, keys, sdpa))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + query_pe
        attn_out = _two_way_attention(layer.cross_attn_image_to_token, k, q, queries, sdpa)
        keys = layer.norm4(keys + attn_out)  # broadcasts (1, hw, C) + (n, hw, C) in layer 1
    q = queries + query_pe
    k = keys + key_pe
    queries = tr.norm_final_attn(queries + _two_way_attention(tr.final_attn_token_to_image, q, k, keys, sdpa))

    iou_pred = dec.iou_prediction_head(queries[:, 0, :])[:, 1:]
    # Multimask outputs only: mask tokens 1..3.
    hyper = torch.stack([dec.output_hypernetworks_mlps[i](queries[:, 1 + i, :]) for i in (1, 2, 3)], dim=1)

    # output_upscaling = ConvT(2,2) → LayerNorm2d → GELU → ConvT(2,2) → GELU, as per-pixel matmuls.
    up1, ln, act1, up2, act2 = dec.output_upscaling
    c1, c2 = up1.out_channels, up2.out_channels
    w1 = up1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)  # (Cin, [a, b, Cout])
    y = (keys @ w1).view(n, h, w, 2, 2, c1) + up1.bias
    y = act1(F.layer_norm(y, (c1,), ln.weight, ln.bias, ln.eps))
    w2 = up2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    y = act2((y @ w2).view(n, h, w, 2, 2, 2, 2, c2) + up2.bias)  # (n, i, j, a, b, a2, b2, C2)
    logits = torch.bmm(y.view(n, -1, c2), hyper.transpose(1, 2))  # (n, h·w·16, 3)
    logits = logits.view(n, h, w, 2, 2, 2, 2, 3)
    # pixel row = 4i + 2a + a2, col = 4j + 2b + b2
    logits = logits.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(n, 3, 4 * h, 4 * w)
    return logits, iou_pred
