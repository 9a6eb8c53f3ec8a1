"""A first run as a new user makes it: the default preset that suits the machine, what a run will cost
said before it costs it, and wrong inputs named instead of empty results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from use_search import presets
from use_search.config import Settings
from use_search.presets import preset_for


def run(args, data_dir, cwd=None, columns="200", timeout=300):
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(data_dir), "COLUMNS": columns, "USE_SEARCH_CONFIG": "/nonexistent"}
    env.pop("USE_SEARCH_PRESET", None)
    return subprocess.run([sys.executable, "-m", "use_search", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


@pytest.fixture
def fresh_notice(monkeypatch):
    monkeypatch.setattr(presets, "_auto_announced", False)


@pytest.mark.parametrize(("cuda", "expected"), [(False, "base"), (True, "paper")])
def test_auto_is_paper_with_cuda_and_base_without_and_says_so_once(monkeypatch, capsys, fresh_notice, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    settings = Settings(preset="auto", device="auto")
    assert Settings().preset == "auto" or os.environ.get("USE_SEARCH_PRESET")  # the default
    chosen = preset_for(settings)
    assert chosen.name == expected and (chosen.sam, chosen.clip) == (presets.PRESETS[expected].sam, presets.PRESETS[expected].clip)
    # On a CPU the grid is smaller (the preset named explicitly keeps SAM's 32×32).
    assert chosen.points_per_side == (32 if cuda else presets.AUTO_CPU_POINTS_PER_SIDE)
    assert preset_for(settings.model_copy(update={"preset": expected})).points_per_side == 32
    assert preset_for(settings.model_copy(update={"sam": "tiny"})).sam == "tiny"  # --sam still applies
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1, notice
    assert f"preset auto → {expected}" in notice[0] and "--preset paper" in notice[0] and "USE_SEARCH_PRESET" in notice[0]
    assert ("CUDA is available" in notice[0]) == cuda


def test_auto_follows_an_explicit_device_and_named_presets_say_nothing(monkeypatch, capsys, fresh_notice):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preset_for(Settings(preset="auto", device="cpu")).name == "base"
    assert preset_for(Settings(preset="auto", device="cuda:1")).name == "paper"
    monkeypatch.setattr(presets, "_auto_announced", False)
    assert preset_for(Settings(preset="tiny", device="auto")).name == "tiny"
    assert preset_for(Settings(preset="paper", device="cpu")).name == "paper"
    assert capsys.readouterr().err.count("preset auto") == 1  # only the first auto run above


def test_default_run_offline_names_the_chosen_preset_once_and_the_tiny_preset(tmp_path, photos):
    r = run(["--offline", "--device", "cpu", "index", str(photos["voc"].parent)], tmp_path / "data")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("preset auto → base") == 1
    assert "sam_vit_b_01ec64.pth" in r.stderr and "ViT-B-16.pt" in r.stderr
    assert "--preset tiny" in r.stderr and "Traceback" not in r.stderr


def test_weights_fetch_offline_lists_every_problem(tmp_path):
    r = run(["--offline", "weights", "fetch", "sam_vit_b", "clip_vit_b16_openai"], tmp_path / "data")
    assert r.returncode == 2
    assert "sam_vit_b_01ec64.pth" in r.stderr and "ViT-B-16.pt" in r.stderr, r.stderr


def test_rate_column_gives_seconds_per_image_and_time_left():
    from rich.progress import Progress

    from use_search.cli import RateColumn

    now = [0.0]
    progress = Progress(RateColumn(), get_time=lambda: now[0])
    task_id = progress.add_task("index", total=10)
    now[0] = 100.0
    progress.update(task_id, completed=2)
    text = RateColumn().render(progress.tasks[0]).plain
    assert text == "0.02 img/s · 50.0 s/img · ETA 0:06:40", text  # 8 images left at 50 s


def test_query_filters_that_match_nothing_say_why_and_exit_2(tmp_path, photos):
    data = tmp_path / "data"
    r = run(["--preset", "tiny", "index", str(photos["chelsea"].parent)], data)  # only sub/
    assert r.returncode == 0, r.stderr
    cases = [
        (["--image", str(tmp_path / "nope.jpg")], "no such file"),
        (["--under", str(tmp_path / "nonexistent")], "no such folder"),
        (["--image", str(photos["voc"])], "nothing is indexed for"),  # there, but not indexed
        (["--under", str(tmp_path / "photos")], None),  # sub/ is under it: hits
    ]
    for flags, message in cases:
        r = run(["--preset", "tiny", "query", "a cat", "--json", *flags], data)
        if message is None:
            assert r.returncode == 0 and r.stdout.strip(), r.stderr
        else:
            assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)
    # Piped: whole paths in the table even at 80 columns.
    r = run(["--preset", "tiny", "query", "a cat", "-k", "3"], data, columns="80")
    assert r.returncode == 0 and str(photos["chelsea"].parent) in r.stdout, r.stdout


def test_curate_stats_on_a_missing_or_empty_folder_is_an_error(tmp_path):
    r = run(["curate", "stats", str(tmp_path / "nope")], tmp_path / "data")
    assert r.returncode == 2 and "no such folder" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run(["curate", "stats", str(tmp_path / "empty")], tmp_path / "data")
    assert r.returncode == 2 and "no pair shards" in r.stderr and "curate run" in r.stderr


def test_semseg_dataset_from_relative_folders(tmp_path, monkeypatch):
    from use_search.eval import SemsegDataset

    for sub in ("gt/images/sub", "gt/labels/sub"):
        (tmp_path / sub).mkdir(parents=True)
    rgb = np.zeros((8, 8, 3), np.uint8)
    for rel in ("a", "sub/b"):
        Image.fromarray(rgb).save(tmp_path / "gt/images" / f"{rel}.jpg")
        Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "gt/labels" / f"{rel}.png")
    (tmp_path / "gt/classes.txt").write_text("background\nthing\n")
    monkeypatch.chdir(tmp_path)
    ds = SemsegDataset.from_folders(Path("gt/images"), Path("gt/labels"), Path("gt/classes.txt"))
    assert [(img.relative_to(tmp_path), lab.relative_to(tmp_path)) for img, lab in ds.pairs] == [
        (Path("gt/images/a.jpg"), Path("gt/labels/a.png")), (Path("gt/images/sub/b.jpg"), Path("gt/labels/sub/b.png")),
    ]
    assert ds.relative(Path("gt/images/sub/b.jpg")) == Path("sub/b.jpg")


def test_train_with_fewer_images_than_a_batch_names_the_option(tmp_path, photos):
    h, w = np.asarray(Image.open(photos["chelsea"])).shape[:2]
    poly = [[2, 2, w - 2, 2, w - 2, h - 2, 2, h - 2]]
    photos["chelsea"].with_suffix(".json").write_text(json.dumps({"segments": [{"segmentation": poly, "texts": ["a cat"]}]}))
    r = run(["--preset", "tiny", "train", "--folder", str(photos["chelsea"].parent), "--out", str(tmp_path / "run")],
            tmp_path / "data")
    assert r.returncode == 2, r.stderr
    assert "1 training images with segments: fewer than one batch of 32" in r.stderr and "--batch-size 1" in r.stderr


def test_hub_model_not_cached_and_hub_unreachable_fails_at_once(monkeypatch):
    from transformers import AutoModel

    from use_search.curation import hf
    from use_search.weights import MissingWeightsError

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf, "hub_host", lambda: "hub.invalid")  # a name no resolver knows (RFC 2606)
    with pytest.raises(MissingWeightsError, match="not in the Hugging Face cache and hub.invalid cannot be reached"):
        hf.load_pretrained("use-search-tests/no-such-model", AutoModel, offline=False, what="test model")
