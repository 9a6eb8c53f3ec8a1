"""CLIP's text tower alone, for queries: a text query needs neither CLIP's image tower nor open_clip's
import chain (torchvision with its detection models and ``torch._dynamo``, transformers when
installed), which costs more than the query itself.

``ClipTextTower`` is open_clip's ``CLIP.encode_text`` for the plain CLIP text transformer (OpenAI's
and most open_clip configs): the same modules (``nn.MultiheadAttention``, LayerNorm, QuickGELU MLP),
parameter names and operation order, so it loads the text weights of a CLIP checkpoint as they are
and gives the same embeddings bit for bit (tested against open_clip). The tokenizer is open_clip's
own ``tokenizer.py``, run without its package ``__init__``. Any other text tower (Hugging Face text
encoders, SigLIP, custom blocks) is loaded through open_clip, and only its image tower is dropped.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from use_search.config import Settings
from use_search.model.clip import (
    TINY_CLIP,
    clip_source,
    infer_clip_arch,
    load_clip,
    load_state_strict,
    model_configs,
    read_clip_state,
    seeded_init_,
)
from use_search.model.text import TextEncoder

# CLIPTextCfg fields (open_clip) this tower implements, with the defaults it supports for the rest.
PLAIN_TEXT_FIELDS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
TEXT_DEFAULTS: dict[str, Any] = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
    "pool_type": "argmax", "proj_bias": False, "proj_type": "linear", "output_tokens": False,
    "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
    "scale_fc": False, "hf_model_name": None, "hf_tokenizer_name": None, "tokenizer_kwargs": None,
    "pad_id": 0, "eos_id": 2,
}


def plain_text_config(arch: str) -> dict[str, Any] | None:
    """The text config of ``arch`` when ``ClipTextTower`` implements it exactly, else None."""
    cfg = model_configs().get(arch)
    if cfg is None or cfg.get("custom_text") or "siglip" in arch.lower():
        return None
    text = cfg["text_cfg"]
    if any(k not in PLAIN_TEXT_FIELDS and (k not in TEXT_DEFAULTS or v != TEXT_DEFAULTS[k]) for k, v in text.items()):
        return None
    return {"embed_dim": cfg["embed_dim"], "context_length": 77, "vocab_size": 49408, "width": 512,
            "heads": 8, "layers": 12, "mlp_ratio": 4.0, **{k: text[k] for k in PLAIN_TEXT_FIELDS if k in text}}


def causal_mask(n: int) -> torch.Tensor:
    """open_clip's additive causal mask: -inf above the diagonal."""
    return torch.full((n, n), float("-inf")).triu_(1)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TextBlock(nn.Module):
    """open_clip's ``ResidualAttentionBlock`` (default block, no layer scale), batch first."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(width, hidden)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(hidden, width))]
        ))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask.to(h.dtype))[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(TextBlock(width, heads, mlp_ratio) for _ in range(layers))


class ClipTextTower(nn.Module):
    """CLIP's text encoder with open_clip's ``CLIP`` parameter names (``token_embedding``,
    ``positional_embedding``, ``transformer.resblocks.*``, ``ln_final``, ``text_projection``)."""

    def __init__(self, embed_dim: int, context_length: int, vocab_size: int, width: int, heads: int,
                 layers: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        # The largest tensor: left uninitialised (``_weight``), it is always loaded or seeded next.
        self.token_embedding = nn.Embedding(vocab_size, width, _weight=torch.empty(vocab_size, width))
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = _Transformer(width, layers, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.register_buffer("attn_mask", causal_mask(context_length), persistent=False)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        dtype = self.transformer.resblocks[0].mlp.c_fc.weight.dtype
        x = self.token_embedding(text).to(dtype) + self.positional_embedding.to(dtype)
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # the EOT token's features
        return x @ self.text_projection


def simple_tokenizer(context_length: int) -> Callable[..., torch.Tensor]:
    """open_clip's ``SimpleTokenizer`` (CLIP's BPE), from open_clip's own ``tokenizer.py`` loaded as a
    file: it needs only ftfy/regex/torch, while ``import open_clip`` runs the whole package."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"].tokenizer.SimpleTokenizer(context_length=context_length)
    name = "use_search._open_clip_tokenizer"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.find_spec("open_clip")
        path = Path(next(iter(spec.submodule_search_locations or []))) / "tokenizer.py" if spec else None
        if path is None or not path.is_file():
            raise ImportError("open_clip is not installed")
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)  # type: ignore[arg-type]
        file_spec.loader.exec_module(module)  # type: ignore[union-attr]
        sys.modules[name] = module
    default = getattr(module, "_tokenizer", None)  # the module builds one at import; the BPE tables take a while
    if default is not None and default.context_length == context_length:
        return default
    return module.SimpleTokenizer(context_length=context_length)


@dataclass
class TextClip:
    """What ``TextEncoder`` needs of a CLIP: tokenizer, ``model.encode_text``, joint-space width."""

    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    arch: str
    model_id: str  # the same id the whole CLIP gets from ``load_clip``
    dim: int


def load_text_clip(name_or_path: str, settings: Settings, arch: str | None = None, device: str = "cpu") -> TextClip:
    """The text tower of the CLIP ``load_clip`` would load for the same arguments, with its model id."""
    src = clip_source(name_or_path, settings, arch)
    if src.random_init:
        cfg = plain_text_config(TINY_CLIP)
        assert cfg is not None
        tower = seeded_init_(ClipTextTower(**cfg))  # the tiny CLIP's text weights (same names, same seed)
        return _text_clip(tower, cfg, TINY_CLIP, src.model_id(TINY_CLIP), device)
    assert src.path is not None
    state, shapes = read_clip_state(src.path, src.registry)
    arch = src.arch or infer_clip_arch(shapes, src.path)
    model_id = src.model_id(arch)
    cfg = plain_text_config(arch)
    if cfg is None:  # a text tower this module does not implement: open_clip's CLIP without its image tower
        bundle = load_clip(name_or_path, settings, arch, device)
        bundle.model.visual = nn.Identity()
        return TextClip(bundle.model, bundle.tokenizer, arch, bundle.model_id, bundle.dim)
    tower = ClipTextTower(**cfg)
    names = set(tower.state_dict())
    load_state_strict(tower, {k: v for k, v in state.items() if k in names}, src.path, f"CLIP {arch}'s text tower")
    del state
    return _text_clip(tower, cfg, arch, model_id, device)


def _text_clip(tower: ClipTextTower, cfg: dict[str, Any], arch: str, model_id: str, device: str) -> TextClip:
    tower.requires_grad_(False)
    return TextClip(tower.to(device).eval(), simple_tokenizer(cfg["context_length"]), arch, model_id, cfg["embed_dim"])


class TextEmbedder:
    """The query side of an ``Embedder``: texts → vectors in the space the index was built in, with the
    same ``model_id`` (crop-CLIP: ``crop-clip:<clip id>``; USE: ``use:<name>-<digest>``), from CLIP's
    text tower alone. ``Searcher`` needs only this."""

    def __init__(self, clip: TextClip, model_id: str, untrained: bool, device: str = "cpu") -> None:
        self.clip = clip
        self.text = TextEncoder(clip, device)  # type: ignore[arg-type]
        self.model_id = model_id
        self.dim = clip.dim
        self.untrained = untrained

    def embed_texts(self, texts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        return self.text.encode(texts, templates)
