"""Build and load SAM models: the official checkpoints by name or path, and the random-init ``tiny``."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from use_search.config import Settings
from use_search.model.registry import parse, tiny_arch
from use_search.weights import REGISTRY, torch_load

# segment-anything's three architectures plus our tiny one:
# (embed dim, depth, heads, global-attention blocks, input size).
SAM_ARCHS: dict[str, tuple[int, int, int, tuple[int, ...], int]] = {
    "vit_h": (1280, 32, 16, (7, 15, 23, 31), 1024),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23), 1024),
    "vit_b": (768, 12, 12, (2, 5, 8, 11), 1024),
    # Random-init, for tests and smoke runs only. A 256 px input (16×16 embedding grid) makes the
    # mask decoder, which runs per prompt, ~16× cheaper on CPU than SAM's 1024 px.
    tiny_arch("sam"): (64, 2, 2, (1,), 256),
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
        return build_sam(tiny_arch("sam"))


def arch_of_state_dict(state: dict[str, torch.Tensor], path: Path | str = "the checkpoint") -> str:
    """The architecture of an official SAM state dict, from its own tensor shapes: encoder width and
    depth, and the input size its position embedding was built for."""
    try:
        width = state["image_encoder.patch_embed.proj.weight"].shape[0]
        grid = state["image_encoder.pos_embed"].shape[1]
    except (KeyError, IndexError, AttributeError):
        raise ValueError(f"checkpoint {path} is not a segment-anything state dict (no image encoder weights)") from None
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for arch, (d, n, _, _, size) in SAM_ARCHS.items():
        if (d, n, size // 16) == (width, depth, grid):
            return arch
    raise ValueError(
        f"checkpoint {path} is no known SAM architecture (encoder width {width}, depth {depth}, "
        f"{grid * 16} px input); segment-anything's are vit_h, vit_l and vit_b"
    )


def load_sam_file(
    path: Path, device: str = "cpu", expect: str | None = None, arch: str | None = None
) -> tuple[Sam, str]:
    """(model, architecture) of an official SAM checkpoint (a plain state dict, as segment-anything
    publishes them). The file's own tensor shapes decide the architecture; ``expect`` names the
    registry entry it must be (``sam_vit_b``), ``arch`` the architecture it was given as (``ARCH:FILE``):
    a file of another architecture is an error."""
    state = torch_load(path, expect)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a segment-anything state dict (no tensors by name)")
    found = arch_of_state_dict(state, path)
    spec = REGISTRY.get(expect or "")
    if spec is not None and spec.arch != found:
        raise ValueError(
            f"checkpoint {path} holds a SAM {found}, not the {spec.arch} that '{spec.name}' is: "
            f"re-fetch with `use-search weights fetch {spec.name}`"
        )
    if arch is not None and arch != found:
        raise ValueError(f"checkpoint {path} holds a SAM {found}, not a {arch}: --sam {found}:{path}")
    arch = found
    sam = build_sam(arch)
    try:
        sam.load_state_dict(state)
    except RuntimeError as e:
        detail = "; ".join(ln.strip() for ln in str(e).splitlines()[1:] if ln.strip())[:300]
        raise ValueError(f"checkpoint {path} does not fit SAM {arch}: {detail}") from None
    return sam.to(device), arch


def load_sam(name_or_path: str, settings: Settings, device: str = "cpu") -> tuple[Sam, str]:
    """(model, model id) for ``tiny``, a registry name (``sam_vit_h``), a checkpoint path or
    ``ARCH:FILE``. The id of a file is ``sam:<arch>:<file name>-<content digest>`` (the registry name
    when the file is the published checkpoint)."""
    src = parse("sam", name_or_path, settings)
    if src.random_init:
        return build_tiny_sam().to(device), src.model_id(tiny_arch("sam"))
    assert src.path is not None
    registry = src.registry
    sam, arch = load_sam_file(src.path, device, registry, None if registry else src.arch)
    return sam, src.model_id(arch)
