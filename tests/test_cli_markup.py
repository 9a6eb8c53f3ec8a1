"""Table-mode ``query`` prints paths as they are: rich markup in a file name is text, not markup."""

from __future__ import annotations

import os
import subprocess
import sys

import skimage.data
from PIL import Image


def run(args, data_dir):
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(data_dir), "COLUMNS": "400", "USE_SEARCH_CONFIG": "/nonexistent"}
    return subprocess.run([sys.executable, "-m", "use_search", "--preset", "tiny", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_query_table_shows_bracketed_paths(tmp_path):
    """Before: a path holding "[/]" crashed with rich's MarkupError; "[bold red]x.png" lost its brackets."""
    root = tmp_path / "photos"
    (root / "a[").mkdir(parents=True)
    for name, dest in (("coffee", root / "a[" / "]b.png"), ("chelsea", root / "[bold red]x.png")):  # "a[/]b.png"
        img = Image.fromarray(getattr(skimage.data, name)())
        img.thumbnail((64, 64))
        img.save(dest)
    r = run(["index", str(root)], tmp_path / "data")
    assert r.returncode == 0, r.stderr
    r = run(["query", "a cup", "-k", "50"], tmp_path / "data")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[bold red]x.png" in r.stdout and "a[/]b.png" in r.stdout, r.stdout
