"""CLIP through open_clip: the official OpenAI checkpoints (TorchScript archive or plain state dict),
any open_clip checkpoint file, and the random-init ``tiny`` architecture shipped as a JSON config.

A CLIP is named by a registry name (``clip_vit_l14_336_openai``), ``tiny``, a file (its open_clip
architecture inferred from its tensor shapes) or ``ARCH:FILE`` (e.g. ``ViT-B-16:/models/clip.pt``).
open_clip itself is imported only where a whole CLIP is built: it imports torchvision (and
transformers when installed), seconds that a text query does not need (see ``text_tower.py``).
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from use_search.config import Settings
from use_search.model.registry import CONFIG_DIR, Source, parse, tiny_arch
from use_search.model.registry import clip_configs as model_configs
from use_search.weights import is_torchscript, safetensors_load, torch_load, torchscript_load

if TYPE_CHECKING:
    import open_clip

TINY_CLIP = tiny_arch("clip")
TINY_SEED = 0
# Kept in OpenAI's CLIP files (TorchScript attributes, and plain state dicts saved from them); OpenAI's
# and open_clip's loaders drop them, the model has no such parameters.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


def _open_clip():  # type: ignore[no-untyped-def]
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def clip_source(name_or_path: str, settings: Settings, arch: str | None = None) -> Source:
    """A CLIP name (``NAME | FILE | ARCH:FILE``, or the model id of a file-loaded CLIP as a USE
    checkpoint records its backbone) resolved by the model registry."""
    return parse("clip", name_or_path, settings, arch)


def read_clip_state(path: Path, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """(tensors, shapes) of a CLIP checkpoint in any published format: OpenAI's TorchScript archive,
    a plain state dict (OpenAI's or open_clip's, possibly under ``state_dict`` / ``module.``) or
    safetensors. Plain zip state dicts are memory-mapped, so tensors nobody uses are never read."""
    if path.suffix == ".safetensors":
        state = safetensors_load(path, name)
    elif is_torchscript(path):
        state = torchscript_load(path, name).state_dict()
    else:
        import zipfile

        state = torch_load(path, name, mmap=zipfile.is_zipfile(path))
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a CLIP state dict (no tensors by name)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in OPENAI_META_KEYS}
    return state, {k: tuple(v.shape) for k, v in state.items()}


def _blocks(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})


def infer_clip_arch(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    """The open_clip architecture whose tensor shapes a checkpoint has (ViT image tower + CLIP text
    transformer); ``ValueError`` saying to pass ``ARCH:FILE`` when none or several fit."""
    try:
        width, _, patch, _ = shapes["visual.conv1.weight"]
        grid = round(math.sqrt(shapes["visual.positional_embedding"][0] - 1))
        vocab, text_width = shapes["token_embedding.weight"]
        found = {
            "embed_dim": shapes["text_projection"][1],
            "vision": (width, _blocks(shapes, "visual.transformer.resblocks."), patch, grid * patch),
            "text": (text_width, _blocks(shapes, "transformer.resblocks."), shapes["positional_embedding"][0], vocab),
        }
    except (KeyError, ValueError):
        raise ValueError(
            f"checkpoint {path} is not an OpenAI / open_clip ViT CLIP state dict; if it is another open_clip "
            "model, pass its architecture: --clip ARCH:FILE"
        ) from None
    fits = []
    for arch, cfg in model_configs().items():
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        if arch.endswith("-quickgelu") or "timm_model_name" in v or "hf_model_name" in t or not isinstance(v.get("layers"), int):
            continue
        want = {
            "embed_dim": cfg["embed_dim"],
            "vision": (v.get("width"), v.get("layers"), v.get("patch_size"), v.get("image_size")),
            "text": (t.get("width", 512), t.get("layers", 12), t.get("context_length", 77), t.get("vocab_size", 49408)),
        }
        if want == found:
            fits.append(arch)
    if len(fits) != 1:
        which = f"several fit ({', '.join(fits)})" if fits else "none of open_clip's architectures fits it"
        raise ValueError(f"cannot tell the CLIP architecture of {path}: {which}; pass it as --clip ARCH:FILE")
    return fits[0]


@dataclass
class ClipBundle:
    model: "open_clip.CLIP"
    tokenizer: Callable[..., torch.Tensor]
    arch: str  # open_clip model name
    model_id: str  # what payloads record, e.g. "clip_vit_l14_336_openai"
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1])


def seeded_init_(module: torch.nn.Module, seed: int = TINY_SEED) -> torch.nn.Module:
    """Random init where each parameter depends only on ``seed``, its name and its shape: the tiny
    CLIP and its text tower built alone (``text_tower.py``) get the same weights without building
    each other. Norm weights 1, biases 0, the rest N(0, 1/fan_in)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "logit_scale":
                p.fill_(math.log(1 / 0.07))
            elif name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1 and name.endswith("weight"):
                p.fill_(1.0)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                fan_in = p.numel() // p.shape[0] if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
    return module


def build_clip(arch: str, quick_gelu: bool = True) -> "open_clip.CLIP":
    """The architecture with random init; weights are loaded by the caller. open_clip warns "no
    pretrained weights loaded" here, which is untrue for the real path, so that warning is muted."""
    open_clip = _open_clip()
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        logging.disable(logging.NOTSET)


def build_tiny_clip() -> "open_clip.CLIP":
    with torch.random.fork_rng(devices=[]):  # open_clip's own init draws from the global generator
        return seeded_init_(build_clip(TINY_CLIP))


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)`` whose failure is a one-line ``ValueError`` naming the file."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        detail = "; ".join(lines)[:300]
        raise ValueError(f"checkpoint {path} does not fit {what}: {detail}") from None


def load_clip(name_or_path: str, settings: Settings, arch: str | None = None, device: str = "cpu") -> ClipBundle:
    """``tiny``, a registry name (``clip_vit_l14_336_openai``), a checkpoint file (architecture
    inferred, or given by ``arch`` / ``ARCH:FILE``)."""
    src = clip_source(name_or_path, settings, arch)
    if src.random_init:
        arch, model = TINY_CLIP, build_tiny_clip()
    else:
        assert src.path is not None
        state, shapes = read_clip_state(src.path, src.registry)
        arch = src.arch or infer_clip_arch(shapes, src.path)
        model = build_clip(arch)
        state = _open_clip().factory.convert_state_dict(model, state)
        load_state_strict(model, state, src.path, f"CLIP {arch}")
    model_id = src.model_id(arch)
    open_clip = _open_clip()
    model = model.to(device).eval()
    cfg = model.visual.preprocess_cfg
    size = model.visual.image_size
    return ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(arch),
        arch=arch,
        model_id=model_id,
        image_size=size[0] if isinstance(size, (tuple, list)) else int(size),
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
    )
