"""The batched automatic-mask path's device kernels (``segmenter/batched.py``): RLE of many masks at
once on the device, the image encoder's attention with scaled-dot-product attention, and SAM's mask
decoder restructured for a whole point grid per call (the reasons are in batched.py's docstring)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from segment_anything.modeling.image_encoder import get_rel_pos


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
def vit_attention_sdpa(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
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


def fast_mask_decoder(
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
