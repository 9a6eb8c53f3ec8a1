"""Options more than one command takes, declared once.

The voting options (semantic segmentation by voting, §4.3, A.2) and the automatic-mask knobs they come
with are taken by ``segment`` and ``eval semseg|parts``. Such a command declares one parameter
``flags: VotingFlags = VotingFlags()`` and the decorator ``voting_options`` puts the typer options in its place (same
order, same names), handing the command their values as one ``VotingFlags``. A new command that votes
takes the same parameter; a new shared option is one more entry of ``VOTING_OPTIONS``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from use_search.cli.shell import banner, err, state

if TYPE_CHECKING:
    from use_search.config import Settings

MEMBERS_HELP = (
    "Ensemble member: a USE checkpoint PATH[:WEIGHT]; repeat it for an ensemble whose per-segment class "
    "probabilities are combined with the weights before voting (paper A.2: curated-data model 1, "
    "COCO-ground-truth model 0.7 on PC-59, 0.25 elsewhere). Given, the members replace the global --model for "
    "this command; index and query always use the one global --model (a store holds one vector space). "
    "Default: the global --model, else crop-CLIP."
)


def misplaced_model_error(given: list[str]) -> ValueError:
    """``--model`` after a voting command: it names the one global checkpoint, before the command."""
    from use_search.config import WeightedModel

    path = WeightedModel.parse_spec(given[0])["path"]
    return ValueError(
        f"--model after the command is not an option: --model names the one global checkpoint and goes before "
        f"the command (use-search --model {path} COMMAND ...); an ensemble member with its weight is "
        f"--member PATH[:WEIGHT], repeated for each member (e.g. --member {given[0]})"
    )


# name of the command's parameter → (its type, its typer option). The mask knobs' defaults are
# segment-anything's, those of ``config.AutoMaskParams``.
VOTING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "members": (Optional[list[str]], typer.Option(None, "--member", help=MEMBERS_HELP)),
    # Not an option here: caught to say that --model is global and the list is --member.
    "misplaced_model": (Optional[list[str]], typer.Option(None, "--model", "-m", hidden=True)),
    "combine": (Optional[str], typer.Option(
        None, "--combine",
        help="Ensemble combination: ovseg (default, A.2 \"same as OVSeg\": p1^(1-λ)·p2^λ with λ = the second "
        "--member's weight relative to the first, so --member curated:1 --member cocogt:0.25 gives p1^0.75·p2^0.25; "
        "the λ must sum below 1), mean (Σ w·p / Σ w) or geometric (Π p^(w/Σw), renormalised per segment).",
    )),
    "templates": (Optional[str], typer.Option(
        None, "--templates", help="Class-name templates: train4, imagenet80 (default) or a file, one per line with {}.",
    )),
    "logit_scale": (Optional[float], typer.Option(
        None, "--logit-scale", help="Softmax scale on cosines (default: each model's training scale; crop-CLIP 100).",
    )),
    "fallback": (Optional[str], typer.Option(
        None, "--fallback",
        help="Pixels no segment covers: nearest (the nearest labelled pixel's class; default of segment), image (the "
        "whole image's class; covered pixels keep their vote) or none (unlabeled, 255; default of eval semseg, the "
        "paper's protocol: a miss).",
    )),
    "points_per_side": (Optional[int], typer.Option(
        None, "--points-per-side", min=1, help="SAM point grid side (default: the preset's; SAM's 32).",
    )),
    "pred_iou_thresh": (Optional[float], typer.Option(
        None, "--pred-iou-thresh", min=0.0, max=1.0, help="SAM predicted-IoU filter (default: SAM's 0.88).",
    )),
    "stability_thresh": (Optional[float], typer.Option(
        None, "--stability-thresh", min=0.0, max=1.0, help="SAM stability-score filter (default: SAM's 0.95).",
    )),
}
VOTING_FIELDS = ("combine", "templates", "logit_scale", "fallback")  # and members, the settings' ``models``
MASK_FIELDS = {"points_per_side": "points_per_side", "pred_iou_thresh": "pred_iou_thresh",
               "stability_thresh": "stability_score_thresh"}  # option → field of the settings' ``amg`` block


@dataclass(frozen=True)
class VotingFlags:
    """The voting and automatic-mask options as given (``None``: not given, the settings decide)."""

    members: Optional[list[str]] = None
    misplaced_model: Optional[list[str]] = None
    combine: Optional[str] = None
    templates: Optional[str] = None
    logit_scale: Optional[float] = None
    fallback: Optional[str] = None
    points_per_side: Optional[int] = None
    pred_iou_thresh: Optional[float] = None
    stability_thresh: Optional[float] = None

    def settings(self) -> Settings:
        """``state.settings`` with these flags applied (validated by the settings model)."""
        s = state.settings
        if self.misplaced_model:
            raise misplaced_model_error(self.misplaced_model)
        given = {"models": self.members or None, **{k: getattr(self, k) for k in VOTING_FIELDS}}
        voting = {k: v for k, v in given.items() if v is not None}
        amg = {field: getattr(self, k) for k, field in MASK_FIELDS.items() if getattr(self, k) is not None}
        return type(s).model_validate({
            **s.model_dump(), "voting": {**s.voting.model_dump(), **voting}, "amg": {**s.amg.model_dump(), **amg},
        })


def voting_options(*, fallback: bool = True) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Replace the command's ``flags`` parameter by the voting options (without ``--fallback`` when
    ``fallback`` is false) and call it with their values as ``flags=VotingFlags(...)``."""
    names = [n for n in VOTING_OPTIONS if fallback or n != "fallback"]

    def wrap(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        params: list[inspect.Parameter] = []
        for p in signature.parameters.values():
            if p.name != "flags":
                params.append(p)
                continue
            params += [inspect.Parameter(n, p.kind, default=VOTING_OPTIONS[n][1], annotation=VOTING_OPTIONS[n][0])
                       for n in names]

        @functools.wraps(command)
        def run(**kwargs: Any) -> None:
            flags = VotingFlags(**{n: kwargs.pop(n) for n in names})
            command(**kwargs, flags=flags)

        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return wrap


def voting_models(settings: Settings):  # type: ignore[no-untyped-def]
    """The SAM segmenter and the voting ensemble; says which models vote with which weight and scale."""
    from use_search.factory import Runtime
    from use_search.query.voting import load_ensemble

    rt = Runtime.from_settings(settings)
    rt.preflight(("sam",))
    ensemble = load_ensemble(settings)
    banner(ensemble.untrained)
    for m in ensemble.describe():
        err.print(f"model {m['model']}  weight {m['weight']:g}  softmax scale {m['logit_scale']:g}", highlight=False)
    return rt.segmenter(), ensemble


def amg_json(segmenter) -> dict:  # type: ignore[no-untyped-def]
    """The automatic-mask settings a segmenter ran with, for a result's ``settings``."""
    return {**segmenter.params.model_dump(), "engine": type(segmenter).__name__}
