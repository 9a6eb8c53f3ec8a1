"""USE checkpoints: only the trainable parts (LLNs, block scales, segment head) in one safetensors file,
with a JSON config in the file's metadata naming the frozen backbones they were trained on.

The backbones are named (preset registry names), measured (layers, widths, grid) and fingerprinted
(a hash of a few of their weights), so loading can say precisely what does not match instead of
producing wrong embeddings from a head trained on other features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as safetensors_bytes_load
from safetensors.torch import save_file

from use_search.model.registry import parse, random_init

if TYPE_CHECKING:
    from use_search.config import Settings

FORMAT = "use-search/use-checkpoint"
FORMAT_VERSION = 1
META_KEY = "use_config"


class CheckpointError(ValueError):
    """The file is not a USE checkpoint, or one this version cannot read."""


class BackboneMismatchError(RuntimeError):
    """The backbones at hand are not the ones a USE checkpoint was trained on."""


@dataclass(frozen=True)
class UseConfig:
    """Everything needed to rebuild a USE model around a set of trainable weights."""

    clip: str  # registry name (clip_vit_l14_336_openai) or "tiny"
    clip_arch: str  # open_clip architecture
    dinov2: str  # registry name (dinov2_vitl14) or "tiny"
    dinov2_arch: str  # timm architecture
    dinov2_blocks: int  # l: DINOv2 blocks used, counted from the last (paper §4.2: 6)
    grid: int  # G: patch grid side; each tower sees the image at G × its patch size
    clip_layers: int  # m: every CLIP block is used (§3.2)
    clip_width: int
    clip_embed_dim: int  # CLIP joint space: width of ĉ and of the output segment embedding
    dinov2_layers: int
    dinov2_width: int
    lln_dim: int  # output width of every LLN (COMM keeps the backbone width; see use.py)
    clip_fingerprint: str
    dinov2_fingerprint: str
    preset: str | None = None
    trained_steps: int = 0
    # Softmax scale the head was trained with, reused to turn its cosines into class probabilities.
    # Eq. 1 writes exp(s·t / τ) with τ = 30 (§4.2); for unit vectors that can only mean the logits
    # are s·t × 30 (a divisor of 30 would flatten the softmax), so τ is stored as a multiplier, like
    # CLIP's logit scale of 100. Checkpoints written before this field were all trained at 30.
    logit_scale: float = 30.0
    format_version: int = FORMAT_VERSION

    @property
    def is_tiny(self) -> bool:
        """Built on a random-init backbone (the registry's ``tiny``)."""
        return random_init("clip", self.clip) or random_init("dinov2", self.dinov2)

    @property
    def z_dim(self) -> int:
        """Width of z = [c̄, ĉ, d̄, d̂] (§3.2)."""
        return self.lln_dim + self.clip_embed_dim + self.lln_dim + self.dinov2_width

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "UseConfig":
        raw = json.loads(text)
        if raw.pop("format", None) != FORMAT:
            raise CheckpointError("metadata is not a USE checkpoint config")
        if int(raw.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format {raw['format_version']} is newer than this use-search ({FORMAT_VERSION}); upgrade"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def fingerprint(*tensors: torch.Tensor) -> str:
    """Short hash of some backbone weights: tells two checkpoints of one architecture apart."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_use_checkpoint(path: Path, state: dict[str, torch.Tensor], config: UseConfig) -> Path:
    """Write atomically (a half-written file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={META_KEY: config.to_json()})
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class UseCheckpoint:
    """A USE checkpoint file as read once: its config, trainable weights and content digest."""

    path: Path
    config: UseConfig
    state: dict[str, torch.Tensor]
    digest: str  # short sha256 of the file: two checkpoints with one file name differ

    @property
    def tag(self) -> str:
        """What the model id records of the file (``registry.model_id``): stem and content digest."""
        return f"{self.path.stem}-{self.digest}"


# Every USE checkpoint a process reads, by resolved path, with the (inode, size, mtime) it was read
# at: preflight, the embedder, the query side and the model all ask for it, and the file is read once.
# A rewritten file (training's last.safetensors) is read again. A few entries: a process uses few.
_CACHE: dict[Path, tuple[tuple[int, int, int], UseCheckpoint]] = {}
_CACHE_SIZE = 8
_cache_lock = threading.Lock()


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read_file(path: Path) -> tuple[bytes, tuple[int, int, int]]:
    """The one place a USE checkpoint file is opened: its bytes and the stamp they were read at."""
    with open(path, "rb") as f:
        return f.read(), _stamp(os.fstat(f.fileno()))


def _parse(path: Path, data: bytes) -> tuple[UseConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a safetensors file's bytes. The format: an 8-byte little-endian header
    length, then a JSON header whose ``__metadata__`` holds our config, then the tensor data."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        state = safetensors_bytes_load(data)
    except Exception as e:  # safetensors raises its own error types for non-safetensors input
        raise CheckpointError(f"{path} is not a safetensors file: {e}") from e
    meta = (header.get("__metadata__") or {}) if isinstance(header, dict) else {}
    if META_KEY not in meta:
        raise CheckpointError(f"{path} has no '{META_KEY}' metadata: not a USE checkpoint")
    return UseConfig.from_json(meta[META_KEY]), state


def open_use_checkpoint(path: Path | str) -> UseCheckpoint:
    """The USE checkpoint at ``path``, read from disk only the first time this process asks for it
    (and again when the file changed)."""
    path = parse("use", str(path)).path
    assert path is not None
    key = path.resolve()
    with _cache_lock:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == _stamp(path.stat()):
            return hit[1]
        data, stamp = _read_file(path)
        config, state = _parse(path, data)
        ckpt = UseCheckpoint(path, config, state, hashlib.sha256(data).hexdigest()[:8])
        _CACHE.pop(key, None)
        _CACHE[key] = (stamp, ckpt)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        return ckpt


def clear_checkpoint_cache() -> None:
    with _cache_lock:
        _CACHE.clear()


def read_use_config(path: Path) -> UseConfig:
    return open_use_checkpoint(path).config


def read_use_checkpoint(path: Path) -> tuple[UseConfig, dict[str, torch.Tensor]]:
    """Config and trainable weights (a new dict; the tensors are shared with the cache, do not change
    them in place)."""
    ckpt = open_use_checkpoint(path)
    return ckpt.config, dict(ckpt.state)


def check_use_preset(path: Path, config: UseConfig, settings: "Settings") -> None:
    """A USE checkpoint runs only on the backbones it was trained on: the preset's (with ``--clip`` /
    ``--dinov2`` applied). A backbone it names by file identity (``clip:ARCH:FILE-DIGEST``) is
    matched by content when it is loaded."""
    from use_search.presets import preset_for

    preset = preset_for(settings)
    named = {"clip": config.clip, "dinov2": config.dinov2}
    wrong = [k for k, v in named.items() if v != getattr(preset, k) and not v.startswith(f"{k}:")]
    if wrong or config.dinov2_blocks != preset.dinov2_blocks:
        raise BackboneMismatchError(
            f"USE checkpoint {path} was trained on CLIP '{config.clip}' + DINOv2 '{config.dinov2}' "
            f"(last {config.dinov2_blocks} blocks, preset '{config.preset}'), but preset '{preset.name}' uses "
            f"CLIP '{preset.clip}' + DINOv2 '{preset.dinov2}' (last {preset.dinov2_blocks} blocks). "
            f"Use --preset {config.preset or '<matching preset>'} or a checkpoint trained for '{preset.name}'."
        )
