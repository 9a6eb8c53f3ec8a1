"""The USE model (paper §3.2): frozen multi-level CLIP + DINOv2 encoder, trainable LLN merge and
segment head, and the ``UseEmbedder`` that index and query use when a USE checkpoint is configured.

Pieces, in data order:
  ``letterbox`` (geometry)   image → square float tensor whose side L is a multiple of the grid G
  ``Backbones`` (frozen)     CLIP patch tokens of all m blocks + ĉ; DINOv2 tokens of the last l blocks + d̂
  ``UseTrainable``           c̄ = Σ α_i LLN(c^i), d̄ = Σ β_i LLN(d^i), z = [c̄, ĉ, d̄, d̂]; mask pooling;
                             linear into CLIP's text space; L2 norm
  ``segment_patch_weights``  (geometry) masks → per-patch area fractions, the pooling weights

Grid alignment. Both towers must give one token per image square so one set of mask weights serves
z = [c̄, ĉ, d̄, d̂]. We feed each tower the same (letterboxed) image resized to G × its own patch size
and resample each tower's position embedding to G×G (bicubic, as timm and open_clip do when
fine-tuning at a new resolution; DINOv2 itself was trained that way at 518 px). Then token (i, j) of
both towers covers exactly the same image square, and the mask weights are exact area fractions of
that square. The alternative, resampling one tower's feature map onto the other's grid, blurs token
borders and mixes features of neighbouring squares, so a segment's pooled feature would draw on
pixels outside it. In the paper's setting (ViT-L/14 CLIP and ViT-L/14 DINOv2, 560 px crops, §4.2)
both towers have patch 14, so G = 40 and the image reaches both at 560 px with no pixel resizing at
all; only CLIP's position embedding moves from 24×24 (336 px) to 40×40.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from use_search.config import Settings
from use_search.model.backbones import BackboneFeatures, Backbones
from use_search.model.base import Embedder
from use_search.model.checkpoint import (
    BackboneMismatchError,
    UseConfig,
    check_use_preset,
    fingerprint,
    open_use_checkpoint,
    save_use_checkpoint,
)
from use_search.model.clip import ClipBundle, load_clip
from use_search.model.dinov2 import Dinov2Bundle, load_dinov2
from use_search.model.geometry import letterbox, segment_patch_weights
from use_search.model.registry import config_name, model_id
from use_search.model.text import TextEncoder
from use_search.presets import Preset, get_preset
from use_search.types import Segment

# Patch grid side per preset. paper: 560 px crops / patch 14 (§4.2). base: ViT-B/16 CLIP at 560 px
# (35 × 16) and DINOv2 ViT-S/14 at 490 px. tiny: 8 patches, CLIP at 128 px, DINOv2 at 112 px.
DEFAULT_GRID: dict[str, int] = {"paper": 40, "base": 35, "tiny": 8}

# ---------------------------------------------------------------------------------------------------
# Trainable parts


class LLN(nn.Sequential):
    """Linear-layer-norm module (COMM, §3.2): LayerNorm then Linear."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__(nn.LayerNorm(width), nn.Linear(width, dim))


class MultiLevelMerge(nn.Module):
    """Σ_i scale_i · LLN_i(tokens_i) over the used blocks: c̄ with α (CLIP), d̄ with β (DINOv2).

    Computed as one linear map after a LayerNorm without affine: with x̂_i the normalised tokens of
    block i, LLN_i = Linear(W_i, b_i) ∘ LayerNorm(γ_i, β_i) and scale s_i,
        Σ_i s_i LLN_i(x_i) = Σ_i x̂_i A_iᵀ + c,   A_i = s_i W_i diag(γ_i),   c = Σ_i s_i (W_i β_i + b_i),
    i.e. one LayerNorm call over all blocks and one batched matmul over the blocks, instead of m
    LayerNorms, m Linears, m scalings and m − 1 additions. ``A`` and ``c`` are rebuilt
    from the parameters on every call (cheap next to the matmul), so training sees the same
    parameters and the state dict keys (``lln.{i}.0`` LayerNorm, ``lln.{i}.1`` Linear, ``scale``)
    are those of the per-block modules."""

    def __init__(self, blocks: int, width: int, dim: int) -> None:
        super().__init__()
        self.lln = nn.ModuleList(LLN(width, dim) for _ in range(blocks))
        # Start as the plain mean over blocks; training moves the block scales (§3.2: learned).
        self.scale = nn.Parameter(torch.full((blocks,), 1.0 / blocks))

    def normalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """x̂: every block's tokens LayerNorm-normalised, without the affine part (folded into A, c)."""
        return F.layer_norm(tokens, tokens.shape[-1:], eps=self.lln[0][0].eps)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (blocks, dim, width) and c (dim,) of the class docstring."""
        gamma = torch.stack([m[0].weight for m in self.lln])  # (m, W)
        beta = torch.stack([m[0].bias for m in self.lln])
        weight = torch.stack([m[1].weight for m in self.lln])  # (m, D, W)
        bias = torch.stack([m[1].bias for m in self.lln])  # (m, D)
        a = self.scale[:, None, None] * weight * gamma[:, None, :]
        c = (self.scale[:, None] * (torch.einsum("mdw,mw->md", weight, beta) + bias)).sum(0)
        return a, c

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(blocks, B, P, width) → (B, P, dim): the merged feature of every patch."""
        a, c = self.folded()
        return torch.einsum("mbpw,mdw->bpd", self.normalize(tokens), a) + c

    def pooled(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The merged feature averaged over each segment's patches: (blocks, B, P, width) tokens and
        (B, k, P) weights whose rows sum to 1 → (B, k, dim). Equal to pooling ``forward``'s output,
        because everything after the normalisation is linear. Pooling first costs m·B·k·width·(P + dim)
        multiply-adds instead of m·B·P·width·dim, less while k < P·dim / (P + dim): about 470 segments
        per image at base, 630 at paper, where SAM gives ~100."""
        a, c = self.folded()
        m, b, k = len(tokens), *weights.shape[:2]
        x_hat = self.normalize(tokens)
        x = torch.matmul(weights.unsqueeze(0).to(x_hat.dtype), x_hat)  # (m, B, k, W)
        # Σ over blocks of (B·k, W) @ A_iᵀ: bmm reads A in its (m, D, W) layout (an einsum over m and
        # W together would first copy A into (m·W, D)); the (m, B·k, D) partial sums are small.
        return torch.bmm(x.reshape(m, b * k, -1), a.transpose(1, 2)).sum(0).view(b, k, -1) + c


class UseTrainable(nn.Module):
    """Everything USE trains (§3.2): the LLNs and block scales of both towers and the segment head.
    Its state dict is exactly what a USE checkpoint stores."""

    def __init__(self, config: UseConfig) -> None:
        super().__init__()
        self.clip_merge = MultiLevelMerge(config.clip_layers, config.clip_width, config.lln_dim)
        self.dino_merge = MultiLevelMerge(config.dinov2_blocks, config.dinov2_width, config.lln_dim)
        self.head = nn.Linear(config.z_dim, config.clip_embed_dim)

    def patch_features(self, feats: BackboneFeatures) -> torch.Tensor:
        """z = [c̄, ĉ, d̄, d̂] for every patch: (B, P, z_dim). The cls embeddings are the same for every
        patch of an image (§3.2: concatenated to every patch)."""
        c_bar = self.clip_merge(feats.clip_blocks)
        d_bar = self.dino_merge(feats.dino_blocks)
        b, p, _ = c_bar.shape
        c_hat = feats.clip_cls[:, None].expand(b, p, -1).to(c_bar.dtype)
        d_hat = feats.dino_cls[:, None].expand(b, p, -1).to(c_bar.dtype)
        return torch.cat([c_bar, c_hat, d_bar, d_hat], dim=-1)

    @staticmethod
    def pool(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted average of z (B, P, D) for all k segments of all B images, (B, k, P) weights →
        (B, k, D), in one batched matmul (§3.2). All-zero (padding) rows give zeros."""
        weights = weights.to(z.dtype)
        return torch.bmm(weights, z) / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    def forward(self, feats: BackboneFeatures, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` (B, k, P) patch weights of k segments per image (all-zero rows are padding) →
        (B, k, E) L2-normalised segment embeddings (padding rows come out as zeros).

        The same as ``head(pool(patch_features(feats), weights))``, computed pooling-first (see
        ``MultiLevelMerge.pooled``); ĉ and d̂ are constant over an image, so their average is
        themselves."""
        total = weights.sum(dim=-1, keepdim=True)
        used = total > 0
        weights = weights / total.clamp_min(1e-12)
        c_bar = self.clip_merge.pooled(feats.clip_blocks, weights)
        d_bar = self.dino_merge.pooled(feats.dino_blocks, weights)
        b, k, _ = c_bar.shape
        c_hat = feats.clip_cls[:, None].expand(b, k, -1).to(c_bar.dtype)
        d_hat = feats.dino_cls[:, None].expand(b, k, -1).to(c_bar.dtype)
        z = torch.cat([c_bar, c_hat, d_bar, d_hat], dim=-1)
        return F.normalize(self.head(z).float(), dim=-1) * used


# ---------------------------------------------------------------------------------------------------
# The whole model


def backbone_fingerprints(clip: ClipBundle, dino: Dinov2Bundle) -> tuple[str, str]:
    v = clip.model.visual
    return (
        fingerprint(v.conv1.weight, v.ln_post.weight, v.proj),
        fingerprint(dino.model.patch_embed.proj.weight, dino.model.norm.weight),
    )


def describe_backbones(
    clip: ClipBundle, dino: Dinov2Bundle, *, grid: int, dinov2_blocks: int, lln_dim: int | None = None,
    preset: str | None = None,
) -> UseConfig:
    """The config of a USE model built on these loaded backbones."""
    visual = clip.model.visual
    clip_fp, dino_fp = backbone_fingerprints(clip, dino)
    width = int(visual.conv1.out_channels)
    return UseConfig(
        clip=config_name("clip", clip.model_id),
        clip_arch=clip.arch,
        dinov2=config_name("dinov2", dino.model_id),
        dinov2_arch=dino.arch,
        dinov2_blocks=dinov2_blocks,
        grid=grid,
        clip_layers=len(visual.transformer.resblocks),
        clip_width=width,
        clip_embed_dim=clip.dim,
        dinov2_layers=dino.depth,
        dinov2_width=dino.width,
        # COMM's LLN keeps the backbone width; one width for both towers makes c̄ and d̄ comparable.
        lln_dim=lln_dim or width,
        clip_fingerprint=clip_fp,
        dinov2_fingerprint=dino_fp,
        preset=preset,
    )


def check_backbones(config: UseConfig, clip: ClipBundle, dino: Dinov2Bundle, source: str) -> None:
    """Raise ``BackboneMismatchError`` unless ``clip``/``dino`` are what ``config`` was built on."""
    found = describe_backbones(clip, dino, grid=config.grid, dinov2_blocks=config.dinov2_blocks, lln_dim=config.lln_dim)
    keys = ("clip", "clip_arch", "clip_layers", "clip_width", "clip_embed_dim", "clip_fingerprint",
            "dinov2", "dinov2_arch", "dinov2_layers", "dinov2_width", "dinov2_fingerprint")
    diff = [f"{k}: checkpoint {getattr(config, k)!r}, loaded {getattr(found, k)!r}"
            for k in keys if getattr(config, k) != getattr(found, k)]
    if diff:
        raise BackboneMismatchError(
            f"{source} was trained on other backbones than the ones loaded:\n  " + "\n  ".join(diff)
            + "\nLoad the CLIP and DINOv2 weights it names (same files), or use a checkpoint trained on these."
        )


class UseModel(nn.Module):
    """Frozen backbones + trainable parts. ``forward(images, weights)`` → segment embeddings."""

    def __init__(self, config: UseConfig, clip: ClipBundle, dino: Dinov2Bundle) -> None:
        super().__init__()
        self.config = config
        self.clip = clip  # also the text tower, frozen too
        clip.model.requires_grad_(False)
        self.backbones = Backbones(clip, dino, config.grid, config.dinov2_blocks)
        self.trainable = UseTrainable(config)

    def forward(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.trainable(self.backbones(images), weights)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.trainable.state_dict()

    def save(self, path: Path, **config_changes: object) -> Path:
        """A USE checkpoint: the trainable state + this model's config (``config_changes`` applied,
        e.g. ``trained_steps``)."""
        return save_use_checkpoint(path, self.trainable_state(), replace(self.config, **config_changes))


def load_backbones(config_or_preset: UseConfig | Preset, settings: Settings, grid: int, device: str) -> tuple[ClipBundle, Dinov2Bundle]:
    """CLIP and DINOv2 by the names of a USE config or a preset (model registry names, files, file
    identities); a missing real checkpoint raises ``MissingWeightsError`` saying which file to put where."""
    if isinstance(config_or_preset, UseConfig):
        clip_arch, dino_arch = config_or_preset.clip_arch, config_or_preset.dinov2_arch
    else:
        clip_arch = dino_arch = None
    clip = load_clip(config_or_preset.clip, settings, arch=clip_arch, device=device)
    dino = load_dinov2(config_or_preset.dinov2, settings, grid, arch=dino_arch, device=device)
    return clip, dino


def build_use_model(
    preset: Preset, settings: Settings, device: str = "cpu", *, grid: int | None = None,
    lln_dim: int | None = None, seed: int = 0,
) -> UseModel:
    """A USE model with freshly initialised (seeded) trainable parts on the preset's backbones."""
    grid = grid or DEFAULT_GRID.get(preset.name, DEFAULT_GRID["paper"])
    clip, dino = load_backbones(preset, settings, grid, device)
    config = describe_backbones(clip, dino, grid=grid, dinov2_blocks=preset.dinov2_blocks, lln_dim=lln_dim, preset=preset.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UseModel(config, clip, dino)
    return model.to(device)


def load_use_model(path: Path, settings: Settings, device: str = "cpu") -> UseModel:
    """Rebuild a USE model from a checkpoint: load the backbones it names, check they are the ones
    it was trained on, load the trainable weights (strictly)."""
    ckpt = open_use_checkpoint(path)
    config, state = ckpt.config, ckpt.state
    clip, dino = load_backbones(config, settings, config.grid, device)
    check_backbones(config, clip, dino, f"USE checkpoint {path}")
    model = UseModel(config, clip, dino)
    missing, unexpected = model.trainable.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneMismatchError(
            f"USE checkpoint {path} does not fit its own config: missing {missing}, unexpected {unexpected}"
        )
    return model.to(device).eval()


def init_use_checkpoint(preset: Preset | str, settings: Settings, out_path: Path, *, grid: int | None = None, seed: int = 0) -> Path:
    """Write an untrained-head USE checkpoint (seeded init, ``trained_steps`` 0) for ``preset``:
    lets the index → query path run with a USE model before any training."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    model = build_use_model(preset, settings, "cpu", grid=grid, seed=seed)
    return model.save(Path(out_path))


# ---------------------------------------------------------------------------------------------------
# Embedder


def _autocast(device: str) -> torch.autocast:
    on_cuda = str(device).startswith("cuda")
    return torch.autocast("cuda" if on_cuda else "cpu", dtype=torch.bfloat16, enabled=on_cuda)


class UseEmbedder(Embedder):
    """Segments of an image → USE embeddings; texts → CLIP text embeddings (the same space).
    The encoder runs once per image, on up to ``batch`` images per forward; all segments of those
    images are pooled in one batched op."""

    def __init__(self, model: UseModel, device: str = "cpu", tag: str = "untrained", batch: int = 8) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.batch = max(1, batch)
        self.config = model.config
        self.text = TextEncoder(model.clip, device)
        self.dim = self.config.clip_embed_dim
        self.untrained = self.config.is_tiny or self.config.trained_steps == 0
        self.model_id = model_id(model.clip.model_id, tag, untrained_tiny=self.config.is_tiny)

    def patch_weights(self, image_shape: tuple[int, int], segments: Sequence[Segment]) -> torch.Tensor:
        """(n, G·G) weights; raises ``ValueError`` on an empty or wrongly sized mask."""
        for i, seg in enumerate(segments):
            if seg.mask.shape != image_shape:
                raise ValueError(f"segment {i}: mask shape {seg.mask.shape} != image shape {image_shape}")
        return torch.from_numpy(segment_patch_weights([s.mask for s in segments], self.config.grid)).to(self.device)

    def embed_segments(self, image: np.ndarray, segments: Sequence[Segment]) -> np.ndarray:
        return self.embed_batch([image], [segments])[0]

    @torch.inference_mode()
    def embed_batch(self, images: Sequence[np.ndarray], segments: Sequence[Sequence[Segment]]) -> list[np.ndarray]:
        """One backbone forward per ``batch`` images. Each image is letterboxed to its own square
        (side a multiple of G) and resized to the towers' input sides, which are the same for all
        images (G × patch), so the images stack into one batch and every image gets exactly what
        ``embed_segments`` alone would give it (to float rounding)."""
        if len(images) != len(segments):
            raise ValueError(f"{len(images)} images but {len(segments)} segment lists")
        out = [np.zeros((0, self.dim), np.float32) for _ in images]
        todo = [i for i, segs in enumerate(segments) if len(segs)]
        weights: dict[int, torch.Tensor] = {}
        for i in todo:  # check every mask before any encoder work
            try:
                weights[i] = self.patch_weights(images[i].shape[:2], segments[i])
            except ValueError as e:
                raise ValueError(f"image {i}: {e}" if len(images) > 1 else str(e)) from None
        bb, grid, fill = self.model.backbones, self.config.grid, self.model.clip.mean
        for start in range(0, len(todo), self.batch):
            chunk = todo[start : start + self.batch]
            inputs = [bb.tower_inputs(letterbox(images[i], grid, fill, self.device)[None]) for i in chunk]
            k = max(len(weights[i]) for i in chunk)
            padded = torch.zeros(len(chunk), k, grid * grid, device=self.device)
            for row, i in enumerate(chunk):
                padded[row, : len(weights[i])] = weights[i]
            with _autocast(self.device):
                feats = bb.encode(torch.cat([c for c, _ in inputs]), torch.cat([d for _, d in inputs]))
                emb = self.model.trainable(feats, padded)
            emb = emb.float().cpu().numpy()
            for row, i in enumerate(chunk):
                out[i] = np.ascontiguousarray(emb[row, : len(weights[i])], dtype=np.float32)
        return out

    def embed_texts(self, texts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        return self.text.encode(texts, templates)


def load_use_embedder(path: Path, settings: Settings, device: str) -> UseEmbedder:
    """The USE embedder of a checkpoint. Its backbones must be the configured preset's: a checkpoint
    trained on other backbones is refused with the preset to use instead."""
    ckpt = open_use_checkpoint(path)
    check_use_preset(ckpt.path, ckpt.config, settings)
    model = load_use_model(ckpt.path, settings, device)
    return UseEmbedder(model, device, tag=ckpt.tag)
