"""DINOv2 through timm: Meta's official backbone files (``dinov2_vitl14_pretrain.pth``), timm's own
DINOv2 checkpoints, and the random-init ``tiny`` architecture.

Meta's format is converted by timm's ``checkpoint_filter_fn`` (it drops ``mask_token``, renames the
SwiGLU ``w12``/``w3`` layers of ViT-g, and resamples the 37×37 position embedding of the 518 px release
to the grid the model is built for), so one loader serves both file formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from use_search.config import Settings
from use_search.model.registry import parse, tiny_arch
from use_search.weights import safetensors_load, torch_load

TINY_DINOV2 = tiny_arch("dinov2")
TINY_SEED = 0
# ImageNet statistics: what DINOv2 was trained with (timm's pretrained cfg for the dinov2 models).
DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)


@dataclass
class Dinov2Bundle:
    model: VisionTransformer
    arch: str  # timm model name, or TINY_DINOV2
    model_id: str  # the model registry's id: registry name, or "dinov2:<arch>:<file name>-<content digest>"
    patch_size: int
    mean: tuple[float, float, float] = DINOV2_MEAN
    std: tuple[float, float, float] = DINOV2_STD

    @property
    def width(self) -> int:
        return int(self.model.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)


def build_tiny_dinov2(grid: int) -> VisionTransformer:
    """A small DINOv2-shaped ViT (patch 14, layer scale, no head), seeded random init: tests only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return VisionTransformer(
            img_size=grid * 14, patch_size=14, embed_dim=64, depth=3, num_heads=2,
            init_values=1e-5, num_classes=0,
        )


def build_dinov2(arch: str, grid: int) -> VisionTransformer:
    """The timm architecture built for a ``grid``×``grid`` patch grid, random init (weights come next)."""
    return timm.create_model(arch, pretrained=False, num_classes=0, img_size=grid * 14)


# Meta's DINOv2 backbones by width (all patch 14): timm's names for them.
DINOV2_BY_WIDTH = {384: "vit_small", 768: "vit_base", 1024: "vit_large", 1536: "vit_giant"}


def read_dinov2_state(path: Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """Meta's ``.pth`` or a timm ``.safetensors``/``.pth`` file, as a state dict; an unreadable file is
    ``UnreadableCheckpointError`` naming it and the fix."""
    state = safetensors_load(path, name) if path.suffix == ".safetensors" else torch_load(path, name)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a DINOv2 state dict (no tensors by name)")
    return state


def infer_dinov2_arch(state: dict[str, torch.Tensor], path: Path) -> str:
    """timm architecture of a DINOv2 state dict (Meta's or timm's layout), from its width, patch size
    and register tokens."""
    try:
        width, _, patch, _ = state["patch_embed.proj.weight"].shape
    except (KeyError, ValueError):
        raise ValueError(f"checkpoint {path} is not a DINOv2 backbone (no patch_embed.proj.weight)") from None
    if patch != 14 or int(width) not in DINOV2_BY_WIDTH:
        raise ValueError(
            f"checkpoint {path}: a ViT of width {width}, patch {patch} is not one of Meta's DINOv2 backbones; "
            "pass its timm architecture: --dinov2 ARCH:FILE"
        )
    registers = "reg_token" in state or "register_tokens" in state
    return f"{DINOV2_BY_WIDTH[int(width)]}_patch14_{'reg4_' if registers else ''}dinov2"


def load_dinov2(
    name_or_path: str, settings: Settings, grid: int, arch: str | None = None, device: str = "cpu"
) -> Dinov2Bundle:
    """``tiny``, a registry name (``dinov2_vitl14``), a checkpoint file (its timm ``arch`` inferred
    from the weights, or given by ``arch`` / ``ARCH:FILE``).

    A registry name whose file is missing raises ``MissingWeightsError`` (from ``weights.resolve``):
    real names never fall back to random weights.
    """
    src = parse("dinov2", name_or_path, settings, arch)
    if src.random_init:
        model, arch = build_tiny_dinov2(grid), TINY_DINOV2
    else:
        path, arch, registry = src.path, src.arch, src.registry
        assert path is not None
        state = read_dinov2_state(path, registry)
        found = infer_dinov2_arch(state, path)
        if arch is None:
            arch = found
        elif registry is not None and found != arch:
            raise ValueError(
                f"checkpoint {path} holds a DINOv2 {found}, not the {arch} that '{registry}' is: "
                f"re-fetch with `use-search weights fetch {registry}`"
            )
        model = build_dinov2(arch, grid)
        try:
            model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
        except RuntimeError as e:
            detail = "; ".join(ln.strip() for ln in str(e).splitlines()[1:] if ln.strip())[:300]
            raise ValueError(f"checkpoint {path} does not fit DINOv2 {arch}: {detail}") from None
    patch = model.patch_embed.patch_size
    return Dinov2Bundle(
        model=model.to(device).eval(), arch=arch, model_id=src.model_id(arch),
        patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
    )
