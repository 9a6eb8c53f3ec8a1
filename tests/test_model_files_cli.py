"""Bad and foreign checkpoints through the real command line (a fresh process each): exit code 2 and one
clear line naming the file and the fix, never a traceback, torch's ``weights_only`` advice or
``Aborted``; models from files (--sam / --clip / --dinov2, env) with their identity in the payload."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import modelfiles as mf
from conftest import write_photos

UNREADABLE = "is unreadable (truncated or not a checkpoint): re-fetch with `use-search weights fetch {}`"


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def assert_user_error(r, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Aborted" not in r.stderr and "weights_only" not in r.stderr, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return mf.official_files(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def one_photo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = write_photos(folder)
    for name in ("astronaut", "chelsea"):  # one image keeps the tiny SAM runs short
        paths[name].unlink()
    return paths["coffee"]


@pytest.mark.parametrize("variant", ["truncated", "html", "empty"])
def test_corrupt_sam_checkpoint(tmp_path, good, one_photo, variant):
    data = tmp_path / "data"
    bad = mf.corrupt(good["sam"], variant, data / "weights" / "sam_vit_b_01ec64.pth")
    r = mf.run_cli(["--preset", "tiny", "--sam", "sam_vit_b", "index", str(one_photo.parent)], data)
    assert_user_error(r, f"checkpoint {bad} " + UNREADABLE.format("sam_vit_b"))


@pytest.mark.parametrize("fmt,variant", [
    ("clip_torchscript", "truncated"), ("clip_openai_sd", "truncated"), ("clip_torchscript", "html"),
    ("clip_torchscript", "empty"),
])
def test_corrupt_clip_checkpoint_on_the_query_path(tmp_path, good, fmt, variant):
    data = tmp_path / "data"
    bad = mf.corrupt(good[fmt], variant, data / "weights" / "ViT-B-16.pt")
    r = mf.run_cli(["--preset", "tiny", "--clip", "clip_vit_b16_openai", "query", "a cat"], data)
    assert_user_error(r, f"checkpoint {bad} " + UNREADABLE.format("clip_vit_b16_openai"))


def test_corrupt_clip_checkpoint_on_the_index_path(tmp_path, good, one_photo):
    data = tmp_path / "data"
    bad = mf.corrupt(good["clip_openai_sd"], "html", data / "weights" / "ViT-L-14-336px.pt")
    r = mf.run_cli(["--preset", "tiny", "--clip", "clip_vit_l14_336_openai", "index", str(one_photo.parent)], data)
    assert_user_error(r, f"checkpoint {bad} " + UNREADABLE.format("clip_vit_l14_336_openai"))


@pytest.mark.parametrize("variant", ["truncated", "html", "empty"])
def test_corrupt_dinov2_checkpoint(tmp_path, good, variant):
    data = tmp_path / "data"
    good_dino = tmp_path / "dino.pth"
    torch.save(mf.dinov2_meta_state(), good_dino)
    bad = mf.corrupt(good_dino, variant, data / "weights" / "dinov2_vits14_pretrain.pth")
    r = mf.run_cli(["--preset", "tiny", "--dinov2", "dinov2_vits14", "model", "init", str(tmp_path / "use.safetensors")], data)
    assert_user_error(r, f"checkpoint {bad} " + UNREADABLE.format("dinov2_vits14"))
    if variant == "html":
        assert f"(it is {len(mf.HTML_PAGE)} bytes; the published file has 88,283,115)" in r.stderr


def test_tiny_sam_saved_under_the_official_name(tmp_path, good, one_photo):
    data = tmp_path / "data"
    (data / "weights").mkdir(parents=True)
    shutil.copy(good["sam"], data / "weights" / "sam_vit_b_01ec64.pth")
    r = mf.run_cli(["--preset", "tiny", "--sam", "sam_vit_b", "index", str(one_photo.parent)], data)
    assert_user_error(r, "holds a SAM tiny, not the vit_b that 'sam_vit_b' is", "use-search weights fetch sam_vit_b")


def test_use_checkpoint_under_another_preset_is_a_user_error(tmp_path):
    data = tmp_path / "data"
    ckpt = tmp_path / "use-tiny.safetensors"
    r = mf.run_cli(["--preset", "tiny", "model", "init", str(ckpt)], data)
    assert r.returncode == 0, r.stderr
    r = mf.run_cli(["--preset", "base", "--model", str(ckpt), "query", "a cat"], data)
    assert_user_error(r, f"USE checkpoint {ckpt} was trained on CLIP 'tiny'", "Use --preset tiny")


def test_query_against_a_store_of_another_model_says_which_and_what_to_do(tmp_path):
    data = tmp_path / "data"
    mf.store_indexed_with(data / "store", "crop-clip:clip_vit_b16_openai", 512)
    r = mf.run_cli(["--preset", "tiny", "query", "a cat"], data)
    assert_user_error(
        r, "built with 'crop-clip:clip_vit_b16_openai' (512-d vectors; this model gives 64-d)",
        "'crop-clip:clip-tiny-untrained'", "--collection", "re-index",
    )
    assert "Vector dimension error" not in r.stderr


def test_weights_verify_and_offline_fetch(tmp_path):
    data = tmp_path / "data"
    (data / "weights").mkdir(parents=True)
    (data / "weights" / "dinov2_vits14_pretrain.pth").write_bytes(b"<html>404</html>")
    r = mf.run_cli(["weights", "verify", "dinov2_vits14"], data)
    assert r.returncode == 1 and "checksum mismatch" in r.stdout and "16 bytes" in r.stdout
    r = mf.run_cli(["--offline", "weights", "fetch", "dinov2_vits14"], data)
    assert_user_error(r, "dinov2_vits14: checksum mismatch", "offline: not downloading it again")
    r = mf.run_cli(["--offline", "weights", "fetch", "sam_vit_b"], data)
    assert_user_error(r, "checkpoint 'sam_vit_b'", "offline mode: not downloading")


def test_clip_from_a_file_is_recorded_by_identity_and_checked_at_query(tmp_path, good, one_photo):
    """--clip FILE (OpenAI's TorchScript archive) for index; USE_SEARCH_CLIP for the query; a query
    with the preset's own CLIP is refused, naming the file-based model."""
    data = tmp_path / "data"
    archive = good["clip_torchscript"]
    r = mf.run_cli(["--preset", "tiny", "--clip", str(archive), "index", str(one_photo.parent)], data)
    assert r.returncode == 0, r.stderr
    digest = __import__("hashlib").sha256(archive.read_bytes()).hexdigest()[:8]
    model_id = f"crop-clip:clip:use-tiny-clip:ViT-tiny.pt-{digest}"
    r = mf.run_cli(["--preset", "tiny", "query", "a cup", "--json", "-k", "2"], data, USE_SEARCH_CLIP=str(archive))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    assert rows and {row["model"] for row in rows} == {model_id}
    r = mf.run_cli(["--preset", "tiny", "query", "a cup"], data)
    assert_user_error(r, f"built with '{model_id}'", "'crop-clip:clip-tiny-untrained'")
