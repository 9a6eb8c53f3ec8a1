"""The query path: CLIP's text tower alone gives the index side's text embeddings and model id, and a
query (or --help, stats, weights, the API's /search) never imports the image-side stacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import modelfiles as mf
from use_search.config import Settings
from use_search.model import load_embedder, load_query_embedder
from use_search.presets import get_preset

TEXTS = ["a dog", "car's license plate", "the red apple on a wooden table", "x"]

# Modules a text query must not import, and why:
#   segment_anything         SAM: only index / segment need masks.
#   torchvision              imported by segment_anything, open_clip and timm; its __init__ imports its
#                            detection models, ops and datasets, which import torch._dynamo: the
#                            largest part of the old query's start-up.
#   torch._dynamo            the compiler stack torchvision drags in (plain torch does not import it).
#   open_clip, timm          the whole-CLIP and DINOv2 builders (both import torchvision).
#   transformers             open_clip imports it when installed (Hugging Face text towers, CoCa).
#   ray                      the distributed indexer.
#   qdrant_client            the server backend's client (~0.8 s); these runs use the embedded store.
HEAVY = ["segment_anything", "torchvision", "torch._dynamo", "open_clip", "timm", "transformers", "ray", "qdrant_client"]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    return {"torchscript": mf.openai_torchscript(d / "ViT-tiny.pt"), "openai_sd": mf.openai_state_dict(d / "clip_sd.pt")}


def settings_for(tmp_path, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", preset="tiny", device="cpu", offline=True, **kw)


@pytest.mark.parametrize("clip", ["tiny", "torchscript", "openai_sd"])
def test_text_only_embedder_equals_the_full_one(tmp_path, clip_files, clip, one_torch_thread):
    s = settings_for(tmp_path, clip=None if clip == "tiny" else str(clip_files[clip]))
    from use_search.presets import preset_for

    full = load_embedder(s, preset_for(s), "cpu")
    text = load_query_embedder(s, preset_for(s), "cpu")
    assert text.model_id == full.model_id and text.dim == full.dim and text.untrained == full.untrained
    assert np.array_equal(text.embed_texts(TEXTS), full.embed_texts(TEXTS))
    assert "visual" not in dict(text.clip.model.named_children())  # no image tower was built


def test_text_only_embedder_of_a_use_checkpoint(tmp_path, one_torch_thread):
    from use_search.model.use import init_use_checkpoint

    s = settings_for(tmp_path)
    ckpt = init_use_checkpoint("tiny", s, tmp_path / "use.safetensors")
    s = settings_for(tmp_path, use_checkpoint=ckpt)
    full = load_embedder(s, get_preset("tiny"), "cpu")
    text = load_query_embedder(s, get_preset("tiny"), "cpu")
    assert text.model_id == full.model_id and text.model_id.startswith("use:use-")
    assert np.array_equal(text.embed_texts(TEXTS, ["a photo of {}"]), full.embed_texts(TEXTS, ["a photo of {}"]))


def test_standalone_tokenizer_is_open_clips():
    import open_clip

    from use_search.model.text_tower import simple_tokenizer

    ours, theirs = simple_tokenizer(77), open_clip.get_tokenizer("ViT-L-14-336")
    texts = ["A photo of a dog.", "car's license-plate #42", "naïve café ☕", ""]
    assert np.array_equal(ours(texts).numpy(), theirs(texts).numpy())


def _imports_after(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a fresh interpreter; report which HEAVY modules it left in sys.modules."""
    probe = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        print("IMPORTS " + json.dumps({{m: m in sys.modules for m in {HEAVY!r} + ["torch"]}}))
    """)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "200", "USE_SEARCH_CONFIG": "/nonexistent", **env})
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("IMPORTS ")), None)
    assert line, r.stdout[-2000:] + r.stderr[-3000:]
    return {"out": r.stdout, "err": r.stderr, "modules": json.loads(line[len("IMPORTS "):])}


def _cli(args: list[str]) -> str:
    return f"""
        import sys
        from use_search.cli import main
        sys.argv = ["use-search", *{args!r}]
        try:
            main()
        except SystemExit as e:
            print("EXIT", e.code)
    """


def test_query_help_stats_weights_import_no_image_stack(tmp_path):
    data = tmp_path / "data"
    mf.store_indexed_with(data / "store", "crop-clip:clip-tiny-untrained", 64)
    env = {"USE_SEARCH_DATA_DIR": str(data)}
    for args, torch_too in [
        (["--preset", "tiny", "query", "a cat", "--json", "-k", "2"], False),
        (["--help"], True), (["stats"], True), (["weights", "list"], True),
    ]:
        r = _imports_after(_cli(args), env)
        assert "EXIT 0" in r["out"] or "EXIT None" in r["out"], (args, r["out"][-500:], r["err"][-2000:])
        imported = [m for m in HEAVY + (["torch"] if torch_too else []) if r["modules"][m]]
        assert imported == [], (args, imported)
    query = _imports_after(_cli(["--preset", "tiny", "query", "a cat", "--json", "-k", "2"]), env)
    rows = [json.loads(ln) for ln in query["out"].splitlines() if ln.startswith("{")]
    assert len(rows) == 2 and rows[0]["model"] == "crop-clip:clip-tiny-untrained"


def test_api_search_imports_no_image_stack(tmp_path):
    data = tmp_path / "data"
    mf.store_indexed_with(data / "store", "crop-clip:clip-tiny-untrained", 64)
    code = """
        from fastapi.testclient import TestClient
        from use_search.api import create_app
        from use_search.config import Settings
        app = create_app(Settings(preset="tiny", device="cpu", offline=True))
        with TestClient(app) as client:
            r = client.post("/search", json={"text": "a cat", "k": 2})
            print("STATUS", r.status_code, len(r.json()["hits"]))
    """
    r = _imports_after(code, {"USE_SEARCH_DATA_DIR": str(data)})
    assert "STATUS 200 2" in r["out"], r["out"][-500:] + r["err"][-2000:]
    assert [m for m in HEAVY if r["modules"][m]] == []


def test_use_checkpoint_on_a_file_clip_is_found_through_clip_option(tmp_path, clip_files, one_torch_thread):
    """A USE checkpoint records a file-loaded CLIP by identity; --clip FILE finds it again (same content),
    and without it the error says which CLIP to pass."""
    from use_search.model.use import init_use_checkpoint
    from use_search.presets import preset_for
    from use_search.weights import MissingWeightsError

    archive = str(clip_files["torchscript"])
    s = settings_for(tmp_path, clip=archive)
    ckpt = init_use_checkpoint(preset_for(s), s, tmp_path / "use.safetensors")
    s = settings_for(tmp_path, clip=archive, use_checkpoint=ckpt)
    full = load_embedder(s, preset_for(s), "cpu")
    text = load_query_embedder(s, preset_for(s), "cpu")
    assert full.config.clip.startswith("clip:use-tiny-clip:ViT-tiny.pt-")
    assert text.model_id == full.model_id
    assert np.array_equal(text.embed_texts(TEXTS), full.embed_texts(TEXTS))
    bare = settings_for(tmp_path, use_checkpoint=ckpt)
    with pytest.raises(MissingWeightsError, match=r"built on CLIP 'clip:use-tiny-clip:ViT-tiny.pt-[0-9a-f]{8}'.*--clip use-tiny-clip:FILE"):
        load_query_embedder(bare, preset_for(bare), "cpu")
