"""Model presets: which SAM, CLIP and DINOv2 a run uses.

``paper`` is the paper's setup (§4.1-4.2); ``base`` is lighter for small GPUs and CPUs; ``tiny`` is
small random-init architectures built in code, for tests and smoke runs only: everything it produces
is marked untrained (payload ``model`` starts with ``untrained-tiny``) and the CLI prints a banner.
``auto`` (the default) is ``paper`` where CUDA is available and ``base`` elsewhere (see ``resolve``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from use_search.config import Settings


@dataclass(frozen=True)
class Preset:
    name: str
    # Model registry names (use_search/model/registry.py): a published checkpoint, or "tiny".
    sam: str
    clip: str
    dinov2: str
    dinov2_blocks: int = 6  # paper §4.2: patch tokens from DINOv2's last 6 blocks
    untrained: bool = False
    # Automatic-mask defaults (segment-anything's own defaults for the real models).
    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95


PRESETS: dict[str, Preset] = {
    "paper": Preset("paper", sam="sam_vit_h", clip="clip_vit_l14_336_openai", dinov2="dinov2_vitl14"),
    "base": Preset("base", sam="sam_vit_b", clip="clip_vit_b16_openai", dinov2="dinov2_vits14", dinov2_blocks=4),
    # Random weights never reach SAM's confidence thresholds, so tiny passes every mask to the NMS;
    # an 8×8 grid (one decoder batch) keeps CPU smoke runs to seconds per image.
    "tiny": Preset(
        "tiny", sam="tiny", clip="tiny", dinov2="tiny", dinov2_blocks=2, untrained=True,
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
    ),
}

UNTRAINED_BANNER = (
    "UNTRAINED MODELS: the 'tiny' preset uses small random-init networks built in code. Masks and "
    "rankings are meaningless; use it only to check that the pipeline runs. For real results fetch "
    "the real weights (`use-search weights fetch --preset paper`) and use --preset paper or base."
)


AUTO = "auto"
PRESET_CHOICES = (AUTO, *PRESETS)
# ``auto`` on a CPU: base with a 16×16 point grid. SAM's decoder and mask post-processing grow with
# the number of prompts and take more than half of base's time per image on a CPU at 32×32; a quarter
# of the prompts still covers the image every 64 px (docs/benchmarks.md, first run on a CPU). An
# explicit ``--preset base`` keeps SAM's 32×32, and ``amg.points_per_side`` overrides either.
AUTO_CPU_POINTS_PER_SIDE = 16

_auto_announced = False  # the auto notice is printed once per process


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_CHOICES)}") from None


def auto_choice(device: str) -> tuple[str, str]:
    """What ``auto`` means with the ``device`` setting: (preset name, why). Only ``device="auto"``
    asks torch whether CUDA is there."""
    if device == "auto":
        import torch

        cuda = torch.cuda.is_available()
    else:
        cuda = device.startswith("cuda")
    if cuda:
        return "paper", "CUDA is available"
    return "base", (
        f"no CUDA device: the paper's SAM ViT-H and CLIP ViT-L/14-336 take minutes per image on a CPU; "
        f"{AUTO_CPU_POINTS_PER_SIDE}×{AUTO_CPU_POINTS_PER_SIDE} point grid"
    )


def resolve(settings: "Settings") -> str:
    """The concrete preset name of ``settings.preset``. ``auto`` prints, once per process, a one-line
    notice on stderr naming the choice, why, and how to override it."""
    global _auto_announced
    if settings.preset != AUTO:
        return settings.preset
    name, why = auto_choice(settings.device)
    if not _auto_announced:
        _auto_announced = True
        print(f"preset auto → {name} ({why}); override with --preset paper|base|tiny or USE_SEARCH_PRESET",
              file=sys.stderr, flush=True)
    return name


def preset_for(settings: "Settings") -> Preset:
    """The settings' preset (``auto`` resolved), with the models ``--sam`` / ``--clip`` / ``--dinov2``
    (settings ``sam``, ``clip``, ``dinov2``) name in place of its own. A random-init ``tiny`` model
    anywhere makes the run untrained."""
    name = resolve(settings)
    p = get_preset(name)
    if settings.preset == AUTO and name == "base":
        p = replace(p, points_per_side=AUTO_CPU_POINTS_PER_SIDE)
    from use_search.model.registry import random_init

    models = {k: getattr(settings, k) or getattr(p, k) for k in ("sam", "clip", "dinov2")}
    return replace(p, **models, untrained=p.untrained or any(random_init(k, v) for k, v in models.items()))
