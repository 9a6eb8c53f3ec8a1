"""Model presets: which SAM, CLIP and DINOv2 a run uses.

``paper`` is the paper's setup (§4.1-4.2); ``base`` is lighter for small GPUs and CPUs; ``tiny`` is
small random-init architectures built in code, for tests and smoke runs only: everything it produces
is marked untrained (payload ``model`` starts with ``untrained-tiny``) and the CLI prints a banner.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from use_search.config import Settings


@dataclass(frozen=True)
class Preset:
    name: str
    sam: str  # registry name, or "tiny"
    clip: str  # registry name, or "tiny"
    dinov2: str  # registry name, or "tiny"
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


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def preset_for(settings: "Settings") -> Preset:
    """The settings' preset, with the models ``--sam`` / ``--clip`` / ``--dinov2`` (settings ``sam``,
    ``clip``, ``dinov2``) name in place of its own. A random-init ``tiny`` model anywhere makes the
    run untrained."""
    p = get_preset(settings.preset)
    models = {k: getattr(settings, k) or getattr(p, k) for k in ("sam", "clip", "dinov2")}
    return replace(p, **models, untrained=p.untrained or "tiny" in models.values())
