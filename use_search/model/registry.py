"""One model registry, in the manner of segment-anything's ``sam_model_registry`` and open_clip's
pretrained registry: every model a run names (SAM, CLIP, DINOv2, a USE checkpoint, and the curation
models) is read here, by one grammar:

  NAME        a registry entry: a published checkpoint (``sam_vit_b``, ``clip_vit_l14_336_openai``,
              ``dinov2_vitl14``; their files, URLs and checksums are ``weights.REGISTRY``) or ``tiny``,
              the family's random-init test architecture built in code (never a fallback: a missing
              checkpoint is ``MissingWeightsError`` saying what to put where)
  FILE        a checkpoint file; the family reads its architecture from its tensor shapes
  ARCH:FILE   a checkpoint file of the given architecture (segment-anything, open_clip or timm name)
  KIND:ARCH:FILE-DIGEST
              the model id of a file-loaded model, as a USE checkpoint records its backbones; found
              through the file the settings name for that family (``--clip`` / ``USE_SEARCH_CLIP`` ...)

A USE checkpoint is a FILE only. ``model_id`` is the one id an embedder records in the store at index
time and a query is checked against.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from use_search.weights import REGISTRY, MissingWeightsError, WeightSpec, file_identity, resolve

if TYPE_CHECKING:
    from use_search.config import Settings

Family = Literal["sam", "clip", "dinov2", "use", "mllm", "grounding"]
TINY = "tiny"  # the name of every family's random-init test architecture
CONFIG_DIR = Path(__file__).parent / "configs"  # open_clip configs of our own architectures (tiny)


@dataclass(frozen=True)
class Entry:
    """A model known by name."""

    name: str
    family: Family
    arch: str  # what the family builds: segment-anything type, open_clip or timm name, or ours
    model_id: str  # what payloads record for it
    spec: WeightSpec | None = None  # the published checkpoint; None: random init, built in code

    @property
    def random_init(self) -> bool:
        """Small random-init weights built in code: tests and smoke runs only, its output untrained."""
        return self.spec is None


# The tiny architectures, with the model ids stores written by earlier versions hold.
TINY_ENTRIES = [
    Entry(TINY, "sam", "tiny", "sam-tiny-untrained"),
    Entry(TINY, "clip", "use-tiny-clip", "clip-tiny-untrained"),
    Entry(TINY, "dinov2", "use-tiny-dinov2", "tiny"),
    Entry(TINY, "mllm", "use-tiny-mllm", "mllm-tiny-untrained"),
    Entry(TINY, "grounding", "use-tiny-grounding-dino", "grounding-dino-tiny-untrained"),
]
ENTRIES: dict[tuple[str, str], Entry] = {
    **{(s.kind, s.name): Entry(s.name, s.kind, s.arch, s.name, s) for s in REGISTRY.values()},
    **{(e.family, e.name): e for e in TINY_ENTRIES},
}


def entry(family: str, name: str | None) -> Entry | None:
    """The registry entry ``name`` is in ``family``, or None (a file, ``ARCH:FILE``, a model id)."""
    return ENTRIES.get((family, str(name)))


def random_init(family: str, name: str | None) -> bool:
    """Whether ``name`` is ``family``'s random-init test architecture (``tiny``)."""
    e = entry(family, name)
    return e is not None and e.random_init


def tiny_arch(family: str) -> str:
    return ENTRIES[(family, TINY)].arch


def config_name(family: str, model_id: str) -> str:
    """The name a USE checkpoint records for a loaded backbone: its registry name (``tiny`` for the
    random-init one), or the file identity that is its model id."""
    return next((e.name for e in ENTRIES.values() if e.family == family and e.model_id == model_id), model_id)


@functools.cache
def clip_configs() -> dict[str, dict[str, Any]]:
    """open_clip's architecture configs (its ``model_configs/*.json``, read without importing
    open_clip) plus ours (``tiny``)."""
    spec = importlib.util.find_spec("open_clip")
    dirs = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    out: dict[str, dict[str, Any]] = {}
    for folder in [*dirs, CONFIG_DIR]:
        for f in sorted(folder.glob("*.json")):
            cfg = json.loads(f.read_text())
            if "embed_dim" in cfg and "vision_cfg" in cfg and "text_cfg" in cfg:
                out[f.stem] = cfg
    return out


def _is_timm_model(arch: str) -> bool:
    import timm

    return bool(timm.is_model(arch))


@dataclass(frozen=True)
class FamilyInfo:
    label: str  # for messages
    option: str  # the CLI option that names it
    arch_kind: str  # whose architecture names ARCH:FILE takes, e.g. "an open_clip architecture"
    arch_example: str


FAMILIES: dict[str, FamilyInfo] = {
    "sam": FamilyInfo("SAM", "--sam", "a segment-anything model type", "vit_h, vit_b"),
    "clip": FamilyInfo("CLIP", "--clip", "an open_clip architecture", "ViT-B-16, ViT-L-14-336"),
    "dinov2": FamilyInfo("DINOv2", "--dinov2", "a timm architecture", "vit_large_patch14_dinov2"),
    "use": FamilyInfo("USE", "--model", "", ""),  # a file only
}


def is_arch(family: str, arch: str) -> bool:
    """Whether ``arch`` names an architecture ``family`` can build (the ARCH of ``ARCH:FILE``)."""
    if family == "sam":
        return arch in {e.arch for e in ENTRIES.values() if e.family == "sam"}
    if family == "clip":
        return arch in clip_configs()
    if family == "dinov2":
        return _is_timm_model(arch)
    return False


@dataclass(frozen=True)
class Source:
    """What a model name resolves to: a random-init entry, or a checkpoint file (and maybe its arch)."""

    family: str
    name: str  # as given
    entry: Entry | None
    path: Path | None  # None for a random-init entry
    arch: str | None  # None until the family infers it from the file

    @property
    def random_init(self) -> bool:
        return self.entry is not None and self.entry.random_init

    @property
    def registry(self) -> str | None:
        """The published checkpoint's registry name, when named so."""
        return self.entry.name if self.entry is not None and not self.entry.random_init else None

    def model_id(self, arch: str) -> str:
        """What payloads record for the model loaded from here with architecture ``arch``."""
        if self.entry is not None:
            return self.entry.model_id
        assert self.path is not None
        return file_identity(self.path, self.family, arch)  # type: ignore[arg-type]


def parse(family: Family, name: str | Path, settings: "Settings | None" = None, arch: str | None = None) -> Source:
    """Resolve ``NAME | FILE | ARCH:FILE`` (or a recorded model id) of ``family`` to its ``Source``,
    downloading a registry checkpoint if allowed. ``arch`` is the architecture a caller already knows
    (a USE checkpoint's config) for a FILE; ``settings`` say where registry checkpoints are cached (a
    USE checkpoint, a FILE only, needs none). A missing checkpoint is ``MissingWeightsError`` naming
    the file and where to put it; a name of another family is a ``ValueError``."""
    name = str(name)
    e = entry(family, name)
    if e is not None:
        return Source(family, name, e, None if e.random_init else resolve(name, _need(settings)), e.arch)
    spec = REGISTRY.get(name)
    if spec is not None:
        raise ValueError(f"'{name}' is a {spec.kind} checkpoint, not {FAMILIES[family].label}")
    path = Path(name).expanduser()
    if path.is_file():
        return Source(family, name, None, path, arch)
    if family == "use":
        raise FileNotFoundError(f"USE checkpoint not found: {path}")
    prefix, _, rest = name.partition(":")
    if prefix == family and rest.count(":") >= 1:
        return _by_identity(family, name, settings)
    if rest and is_arch(family, prefix):
        return Source(family, name, None, resolve(rest, _need(settings)), prefix)
    if rest and Path(rest).expanduser().is_file():
        info = FAMILIES[family]
        raise ValueError(f"'{prefix}' is not {info.arch_kind} (e.g. {info.arch_example}): {info.option} {name}")
    return Source(family, name, None, resolve(name, _need(settings)), arch)  # raises: neither a file nor a known name


def _need(settings: "Settings | None") -> "Settings":
    if settings is None:
        raise TypeError("resolving a registry checkpoint needs the settings (where checkpoints are cached)")
    return settings


def _by_identity(family: Family, identity: str, settings: "Settings | None") -> Source:
    """A model id ``KIND:ARCH:FILE-DIGEST``: the file the settings name for ``family``, when its content
    has that identity."""
    arch = identity.split(":", 2)[1]
    given = getattr(settings, family, None)
    if given and given != identity:
        src = parse(family, given, settings)
        found = file_identity(src.path, family, src.arch or arch) if src.path else None  # type: ignore[arg-type]
        if found == identity:
            return Source(family, identity, None, src.path, arch)
    info = FAMILIES[family]
    raise MissingWeightsError(
        f"the model was built on {info.label} '{identity}', loaded from a file: pass that file with "
        f"{info.option} {arch}:FILE (or USE_SEARCH_{family.upper()})"
    )


def model_id(clip_id: str, use_tag: str | None = None, *, untrained_tiny: bool = False) -> str:
    """The id an embedder records in every payload at index time and a query is checked against (the
    store refuses a query of another id): ``crop-clip:<CLIP id>`` for the training-free baseline, or
    ``use:<tag>`` for a USE model, ``tag`` being its checkpoint's file stem and content digest, marked
    when its backbones are the random-init tiny ones. Index and query both get it from here."""
    if use_tag is None:
        return f"crop-clip:{clip_id}"
    return f"use:{use_tag}" + (":untrained-tiny" if untrained_tiny else "")
