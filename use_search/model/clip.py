"""CLIP through open_clip: the official OpenAI checkpoints (TorchScript archive or open_clip state dict),
any open_clip checkpoint file, and the random-init ``tiny`` architecture shipped as a JSON config."""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from use_search.config import Settings
from use_search.weights import REGISTRY, resolve

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_CLIP = "use-tiny-clip"
TINY_SEED = 0
open_clip.add_model_config(CONFIG_DIR)


@dataclass
class ClipBundle:
    model: open_clip.CLIP
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    arch: str  # open_clip model name
    model_id: str  # what payloads record, e.g. "clip_vit_l14_336_openai"
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1])


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if _is_torchscript(path):  # OpenAI's release format
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        return state
    return open_clip.factory.load_state_dict(str(path))


def build_clip(arch: str, quick_gelu: bool = True) -> open_clip.CLIP:
    """The architecture with random init; weights are loaded by the caller. open_clip warns "no
    pretrained weights loaded" here, which is untrue for the real path, so that warning is muted."""
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        logging.disable(logging.NOTSET)


def load_clip(name_or_path: str, settings: Settings, arch: str | None = None, device: str = "cpu") -> ClipBundle:
    """``tiny``, a registry name (``clip_vit_l14_336_openai``) or a checkpoint file plus its ``arch``."""
    if name_or_path == "tiny":
        arch, model_id = TINY_CLIP, "clip-tiny-untrained"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = build_clip(arch)
    else:
        spec = REGISTRY.get(name_or_path)
        if spec is not None:
            arch = spec.arch
        if arch is None:
            raise ValueError(f"loading CLIP from a file needs its open_clip architecture (e.g. ViT-L-14-336): {name_or_path}")
        path = resolve(name_or_path, settings)
        model = build_clip(arch)
        state = open_clip.factory.convert_state_dict(model, _state_dict(path))
        model.load_state_dict(state)
        model_id = spec.name if spec else f"clip:{arch}:{path.name}"
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
