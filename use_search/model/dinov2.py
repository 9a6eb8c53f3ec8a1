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
from use_search.weights import REGISTRY, resolve

TINY_DINOV2 = "use-tiny-dinov2"
TINY_SEED = 0
# ImageNet statistics: what DINOv2 was trained with (timm's pretrained cfg for the dinov2 models).
DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)


@dataclass
class Dinov2Bundle:
    model: VisionTransformer
    arch: str  # timm model name, or TINY_DINOV2
    model_id: str  # registry name, "tiny", or "dinov2:<arch>:<file name>"
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


def load_dinov2_state(path: Path, model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Meta's ``.pth`` or a timm ``.safetensors``/``.pth`` file, converted to ``model``'s keys and grid."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    return checkpoint_filter_fn(state, model)


def load_dinov2(
    name_or_path: str, settings: Settings, grid: int, arch: str | None = None, device: str = "cpu"
) -> Dinov2Bundle:
    """``tiny``, a registry name (``dinov2_vitl14``) or a checkpoint file plus its timm ``arch``.

    A registry name whose file is missing raises ``MissingWeightsError`` (from ``weights.resolve``):
    real names never fall back to random weights.
    """
    if name_or_path == "tiny":
        model, arch, model_id = build_tiny_dinov2(grid), TINY_DINOV2, "tiny"
    else:
        spec = REGISTRY.get(name_or_path)
        if spec is not None:
            if spec.kind != "dinov2":
                raise ValueError(f"'{name_or_path}' is a {spec.kind} checkpoint, not DINOv2")
            arch = spec.arch
        if arch is None:
            raise ValueError(
                f"loading DINOv2 from a file needs its timm architecture (e.g. vit_large_patch14_dinov2): {name_or_path}"
            )
        path = resolve(name_or_path, settings)
        model = build_dinov2(arch, grid)
        model.load_state_dict(load_dinov2_state(path, model), strict=True)
        model_id = spec.name if spec else f"dinov2:{arch}:{path.name}"
    patch = model.patch_embed.patch_size
    return Dinov2Bundle(
        model=model.to(device).eval(), arch=arch, model_id=model_id,
        patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
    )
