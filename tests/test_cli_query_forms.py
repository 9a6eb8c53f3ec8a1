"""``use-search query``'s forms as a user runs them: a real subprocess, real photos, the tiny preset,
the embedded store. Exact rankings are checked on known vectors in test_query_forms.py; here, that the
flags reach the forms, what they print, and the errors (exit 2, one line, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_photos


def run(args: list[str], data: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(data), "COLUMNS": "200", "USE_SEARCH_CONFIG": "/nonexistent",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "use_search", "--preset", "tiny", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def rows(r: subprocess.CompletedProcess) -> list[dict]:
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli-forms")
    photos = write_photos(root / "photos")
    r = run(["index", str(root / "photos")], root / "data")
    assert r.returncode == 0, r.stderr
    return {"data": root / "data", "photos": photos}


def test_like_leaves_out_the_example_and_with_other_images_its_image(indexed) -> None:
    data = indexed["data"]
    first = rows(run(["query", "a cat", "-k", "1", "--json"], data))[0]
    like = rows(run(["query", "--like", first["id"], "-k", "50", "--json"], data))
    assert like and first["id"] not in {r["id"] for r in like}
    assert [r["score"] for r in like] == sorted((r["score"] for r in like), reverse=True)
    other = rows(run(["query", "--like", first["id"], "--other-images", "-k", "50", "--json"], data))
    assert other and first["sha256"] not in {r["sha256"] for r in other}
    assert [r["id"] for r in other] == [r["id"] for r in like if r["sha256"] != first["sha256"]]
    both = rows(run(["query", "a dog", "--like", first["id"], "--not", "grass", "-k", "5", "--json"], data))
    assert len(both) == min(5, len(like)) and first["id"] not in {r["id"] for r in both}


def test_all_and_group_print_one_row_per_image(indexed) -> None:
    data = indexed["data"]
    found = rows(run(["query", "--all", "a cat", "--all", "a sofa", "--json"], data))
    assert found and len({r["sha256"] for r in found}) == len(found)
    for r in found:
        assert r["phrases"] == ["a cat", "a sofa"] and len(r["segments"]) == 2
        assert all(s["rle"]["counts"] and s["sha256"] == r["sha256"] for s in r["segments"])
        assert r["score"] == min(s["score"] for s in r["segments"])
    groups = rows(run(["query", "a cat", "--group", "image", "-k", "3", "--json"], data))
    assert len(groups) == 3 and len({g["sha256"] for g in groups}) == 3
    assert all(g["score"] == g["segments"][0]["score"] for g in groups)
    table = run(["query", "--all", "a cat", "--all", "a sofa", "-k", "2"], data)
    assert table.returncode == 0 and "images for “a cat” + “a sofa”" in table.stdout and "a cat: seg" in table.stdout


def test_like_image_whole_and_under_a_point(indexed) -> None:
    data, chelsea = indexed["data"], str(indexed["photos"]["chelsea"])
    whole = rows(run(["query", "--like-image", chelsea, "-k", "3", "--json"], data))
    assert len(whole) == 3
    outside = run(["query", "--like-image", f"{chelsea}@99999,1"], data)
    assert outside.returncode == 2 and "outside the image" in outside.stderr and "Traceback" not in outside.stderr


@pytest.mark.parametrize("args,words", [
    (["--like", "00000000-0000-0000-0000-000000000000"], "no segment with id"),
    (["--all", "x"] * 9, "at most 8"),
    (["--all", "a cat", "--none", "a dog"], "--none needs --all and --min-score"),
    (["-k", "3"], "give TEXT, --like"),
    (["a cat", "--all", "a dog"], "--all cannot be combined"),
    (["a cat", "--group", "folder"], "--group takes 'image'"),
])
def test_bad_input_is_one_line_and_exit_2(indexed, args: list[str], words: str) -> None:
    r = run(["query", *args], indexed["data"])
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
