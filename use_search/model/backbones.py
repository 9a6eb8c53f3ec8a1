"""The USE model's frozen encoder (paper §3.2): multi-level CLIP and DINOv2 patch tokens on one grid
(see model/use.py for the grid alignment), and the SDPA fast path of an open_clip residual block."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from use_search.model.clip import ClipBundle
from use_search.model.dinov2 import Dinov2Bundle
# ---------------------------------------------------------------------------------------------------
# Frozen backbones


@dataclass
class BackboneFeatures:
    """What the frozen towers produce for a batch: the inputs of everything trainable."""

    clip_blocks: torch.Tensor  # (m, B, P, Wc) patch tokens after each CLIP block c^0..c^{m-1}
    clip_cls: torch.Tensor  # (B, E) ĉ: CLIP's image embedding (cls token, ln_post, projection)
    dino_blocks: torch.Tensor  # (l, B, P, Wd) patch tokens after DINOv2 blocks n-l..n-1
    dino_cls: torch.Tensor  # (B, Wd) d̂: DINOv2's final normed cls token

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "BackboneFeatures":
        return BackboneFeatures(**{f.name: getattr(self, f.name).to(device, dtype) for f in fields(self)})

    def per_image(self, i: int) -> dict[str, torch.Tensor]:
        """Image ``i``'s features (batch dim dropped), e.g. to cache on disk."""
        return {
            "clip_blocks": self.clip_blocks[:, i], "clip_cls": self.clip_cls[i],
            "dino_blocks": self.dino_blocks[:, i], "dino_cls": self.dino_cls[i],
        }

    @classmethod
    def stack(cls, items: Sequence[dict[str, torch.Tensor]]) -> "BackboneFeatures":
        return cls(
            clip_blocks=torch.stack([x["clip_blocks"] for x in items], dim=1),
            clip_cls=torch.stack([x["clip_cls"] for x in items]),
            dino_blocks=torch.stack([x["dino_blocks"] for x in items], dim=1),
            dino_cls=torch.stack([x["dino_cls"] for x in items]),
        )


class Backbones(nn.Module):
    """Frozen CLIP image tower (open_clip) and DINOv2 (timm), aligned on one G×G patch grid."""

    def __init__(self, clip: ClipBundle, dino: Dinov2Bundle, grid: int, dinov2_blocks: int) -> None:
        super().__init__()
        visual = clip.model.visual
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise ValueError(f"CLIP {clip.arch}: only class-token ViT image towers are supported")
        if not getattr(visual.transformer, "batch_first", True):
            raise ValueError(f"CLIP {clip.arch}: needs open_clip's batch-first transformer (open_clip ≥ 3)")
        if not 1 <= dinov2_blocks <= dino.depth:
            raise ValueError(f"dinov2_blocks must be in 1..{dino.depth}, got {dinov2_blocks}")
        if dino.model.num_prefix_tokens < 1 or not dino.model.has_class_token:
            raise ValueError(f"DINOv2 {dino.arch}: needs a class token")
        self.clip_visual = visual
        self.dino = dino.model
        self.grid = grid
        self.dinov2_blocks = dinov2_blocks
        self.clip_patch = int(visual.patch_size[0])
        self.dino_patch = dino.patch_size
        if tuple(self.dino.patch_embed.grid_size) != (grid, grid):
            raise ValueError(f"DINOv2 was built for a {self.dino.patch_embed.grid_size} grid, not {grid}×{grid}")
        native = visual.grid_size[0]
        pos = visual.positional_embedding.detach()[None]  # (1, 1 + g², Wc)
        if native != grid:
            pos = resample_abs_pos_embed(pos, new_size=[grid, grid], old_size=[native, native], num_prefix_tokens=1)
        self.register_buffer("clip_pos", pos[0].clone(), persistent=False)
        self.register_buffer("clip_mean", torch.tensor(clip.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(clip.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("dino_mean", torch.tensor(dino.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("dino_std", torch.tensor(dino.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Backbones":
        return super().train(False)  # frozen: always eval (no dropout, no patch dropout)

    def tower_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, L, L) in [0, 1], L a multiple of G → each tower's normalised input at G × its patch."""
        def resize(x: torch.Tensor, size: int) -> torch.Tensor:
            if x.shape[-1] == size:
                return x
            return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

        if images.shape[-1] != images.shape[-2] or images.shape[-1] % self.grid:
            raise ValueError(f"images must be square with a side divisible by {self.grid}, got {tuple(images.shape)}")
        clip_x = (resize(images, self.grid * self.clip_patch) - self.clip_mean) / self.clip_std
        dino_x = (resize(images, self.grid * self.dino_patch) - self.dino_mean) / self.dino_std
        return clip_x, dino_x

    def clip_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip's VisionTransformer forward with the resampled position embedding, keeping every
        block's patch tokens (§3.2: c^0..c^{m-1}), written straight into one (m, B, P, Wc) tensor."""
        v = self.clip_visual
        x = v.conv1(x).flatten(2).transpose(1, 2)  # (B, P, Wc)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + self.clip_pos.to(x.dtype))
        resblocks = v.transformer.resblocks
        out = None
        for i, block in enumerate(resblocks):
            x = clip_block(block, x)
            if out is None:  # the first block's output fixes the dtype (bf16 under autocast)
                out = x.new_empty(len(resblocks), x.shape[0], x.shape[1] - 1, x.shape[2])
            out[i] = x[:, 1:]
        cls_embed = v.ln_post(x[:, 0]) @ v.proj  # ĉ: CLIP's image embedding
        return out, cls_embed

    def dino_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        final, blocks = self.dino.forward_intermediates(
            x, indices=self.dinov2_blocks, norm=False, output_fmt="NLC"
        )
        return torch.stack(blocks), final[:, 0]  # tokens of the last l blocks; d̂ = normed cls

    @torch.no_grad()
    def encode(self, clip_x: torch.Tensor, dino_x: torch.Tensor) -> BackboneFeatures:
        """Both towers on their ``tower_inputs`` (B images each)."""
        clip_blocks, clip_cls = self.clip_forward(clip_x)
        dino_blocks, dino_cls = self.dino_forward(dino_x)
        return BackboneFeatures(clip_blocks, clip_cls, dino_blocks, dino_cls)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> BackboneFeatures:
        return self.encode(*self.tower_inputs(images))


def _sdpa_ready(block: nn.Module) -> bool:
    """``block`` is open_clip's plain self-attention ``ResidualAttentionBlock`` (batch first, packed
    q/k/v projection, no extra k/v biases): the layout ``clip_block`` reimplements."""
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, "attn", None)
    return (
        type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
        and isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None and attn.bias_k is None and not attn.add_zero_attn
    )


def clip_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for an open_clip ViT block, (B, N, W) batch first, with attention through
    ``F.scaled_dot_product_attention``.

    Why not ``block(x)``: under no_grad and without autocast (CPU inference), nn.MultiheadAttention
    takes its native fast path, which on CPU materialises the (heads, N, N) attention matrix. At
    USE's N = 1 + G² tokens (1226 at base, 1601 at paper) CLIP's attention then ran at ~40% of the
    GEMMs' rate and cost 70% as much as all of the block's linear layers; SDPA's fused kernel tiles
    it (docs/notes-model.md, "USE encoder throughput"). Same weights, same math: outputs agree to
    float rounding (tested against ``block(x)``)."""
    if not _sdpa_ready(block):
        return block(x)
    attn = block.attn
    b, n, w = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head width), as nn.MultiheadAttention
    y = F.linear(y.transpose(1, 2).reshape(b, n, w), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(y)
    return x + block.ls_2(block.mlp(block.ln_2(x)))
