"""Options declared once: the voting and automatic-mask options every voting command takes (cli/options.py)
and the automatic-mask knobs of the settings (config.AutoMaskParams)."""

from __future__ import annotations

import pytest
import typer

from use_search.cli import app
from use_search.cli.options import VOTING_OPTIONS, VotingFlags
from use_search.cli.shell import state
from use_search.config import AutoMaskParams, AutoMaskSettings, Settings
from use_search.presets import get_preset


def command(*path: str):  # type: ignore[no-untyped-def]
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def options(*path: str) -> dict[str, tuple[str, ...]]:
    return {p.name: tuple(p.opts) for p in command(*path).params}


@pytest.mark.parametrize("path, fallback", [(("segment",), True), (("eval", "semseg"), True), (("eval", "parts"), False)])
def test_every_voting_command_takes_the_shared_options(path, fallback):
    got = options(*path)
    for name, (_, option) in VOTING_OPTIONS.items():
        if name == "fallback" and not fallback:
            assert name not in got
            continue
        assert got[name] == tuple(option.param_decls), name
    assert "flags" not in got


def test_the_shared_options_keep_their_place_among_the_command_s_own():
    assert list(options("eval", "semseg")) == [
        "images", "labels", "classes", "ignore_index", "reduce_zero_label", "limit", "save_preds",
        "members", "misplaced_model", "combine", "templates", "logit_scale", "fallback", "points_per_side", "pred_iou_thresh",
        "stability_thresh", "per_class", "as_json", "out_file",
    ]


def test_flags_given_replace_the_settings_and_the_rest_stay(monkeypatch):
    monkeypatch.setattr(state, "settings", Settings(amg=AutoMaskSettings(box_nms_thresh=0.5)))
    s = VotingFlags(members=["a.safetensors:0.25"], logit_scale=50.0, points_per_side=4, stability_thresh=0.0).settings()
    assert [(m.path.name, m.weight) for m in s.voting.models] == [("a.safetensors", 0.25)]
    assert s.voting.logit_scale == 50.0 and s.voting.combine == "ovseg"
    assert (s.amg.points_per_side, s.amg.stability_score_thresh, s.amg.pred_iou_thresh) == (4, 0.0, None)
    assert s.amg.box_nms_thresh == 0.5


def test_mask_settings_take_what_they_leave_open_from_the_preset():
    tiny = get_preset("tiny")
    params = AutoMaskSettings().for_preset(tiny)
    assert isinstance(params, AutoMaskParams)
    assert (params.points_per_side, params.pred_iou_thresh, params.stability_score_thresh) == (8, 0.0, 0.0)
    # A value given wins over the preset's, zero thresholds included.
    base = get_preset("base")
    params = AutoMaskSettings(points_per_side=4, pred_iou_thresh=0.0, crop_n_layers=1).for_preset(base)
    assert (params.points_per_side, params.pred_iou_thresh, params.stability_score_thresh) == (4, 0.0, 0.95)
    assert params.crop_n_layers == 1 and params.post_nms_thresh == 0.7


@pytest.mark.parametrize("bad, words", [
    ({"points_per_side": 0}, "points_per_side"),
    ({"crop_n_layers": -1}, "crop_n_layers"),
    ({"points_per_side": 2, "crop_n_layers": 2, "crop_n_points_downscale_factor": 2}, "last crop layer gets no points"),
])
def test_a_grid_without_points_is_refused_by_the_settings_and_the_params(bad, words):
    for model in (AutoMaskSettings, AutoMaskParams):
        with pytest.raises(ValueError, match=words):
            model(**bad)


@pytest.mark.parametrize("path", [("segment",), ("eval", "semseg"), ("eval", "parts")])
def test_the_weighted_list_is_member_and_model_after_the_command_points_to_it(path, monkeypatch):
    """``--model`` means the one global checkpoint; the ensemble list is ``--member PATH[:WEIGHT]``."""
    got = options(*path)
    assert got["members"] == ("--member",)
    hidden = [p for p in command(*path).params if p.name == "misplaced_model"]
    assert hidden and hidden[0].hidden
    monkeypatch.setattr(state, "settings", Settings())
    with pytest.raises(ValueError) as e:
        VotingFlags(misplaced_model=["a.safetensors:0.25"]).settings()
    msg = str(e.value)
    assert "--member PATH[:WEIGHT]" in msg and "use-search --model a.safetensors" in msg
