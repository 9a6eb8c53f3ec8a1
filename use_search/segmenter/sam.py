"""Build and load SAM models: the official checkpoints by name or path, and the random-init ``tiny``."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from use_search.config import Settings
from use_search.weights import REGISTRY, resolve

# segment-anything's three architectures plus our tiny one:
# (embed dim, depth, heads, global-attention blocks, input size).
SAM_ARCHS: dict[str, tuple[int, int, int, tuple[int, ...], int]] = {
    "vit_h": (1280, 32, 16, (7, 15, 23, 31), 1024),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23), 1024),
    "vit_b": (768, 12, 12, (2, 5, 8, 11), 1024),
    # Random-init, for tests and smoke runs only. A 256 px input (16×16 embedding grid) makes the
    # mask decoder, which runs per prompt, ~16× cheaper on CPU than SAM's 1024 px.
    "tiny": (64, 2, 2, (1,), 256),
}
TINY_SEED = 0


def build_sam(arch: str) -> Sam:
    """SAM with the official layout (16 px patches, 256-d prompts); random init."""
    embed_dim, depth, heads, global_idx, image_size = SAM_ARCHS[arch]
    prompt_dim, patch = 256, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_idx, window_size=14,
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(image_size // patch, image_size // patch),
            input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build_tiny_sam() -> Sam:
    """The tiny preset's SAM: seeded, so every process builds the same untrained network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build_sam("tiny")


def arch_of_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Tell the architecture of an official SAM state dict from its encoder width and depth."""
    try:
        width = state["image_encoder.patch_embed.proj.weight"].shape[0]
    except KeyError:
        raise ValueError("not a segment-anything state dict (no image_encoder.patch_embed.proj.weight)") from None
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for arch, (d, n, *_) in SAM_ARCHS.items():
        if (d, n) == (width, depth):
            return arch
    raise ValueError(f"unknown SAM architecture: encoder width {width}, depth {depth}")


def load_sam_file(path: Path, device: str = "cpu") -> Sam:
    """Load an official SAM checkpoint (a plain state dict, as segment-anything publishes them)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    sam = build_sam(arch_of_state_dict(state))
    sam.load_state_dict(state)
    return sam.to(device)


def load_sam(name_or_path: str, settings: Settings, device: str = "cpu") -> tuple[Sam, str]:
    """(model, model id) for ``tiny``, a registry name (``sam_vit_h``) or a checkpoint path."""
    if name_or_path == "tiny":
        return build_tiny_sam().to(device), "sam-tiny-untrained"
    path = resolve(name_or_path, settings)
    spec = REGISTRY.get(name_or_path)
    return load_sam_file(path, device), spec.name if spec else f"sam:{path.name}"
