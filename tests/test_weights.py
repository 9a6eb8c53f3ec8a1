"""Weights registry and checkpoint loading: downloads over real HTTP (127.0.0.1), sizes and checksums,
offline behaviour, the official formats (built here with random weights) and their corrupt variants."""

import hashlib
import threading
from dataclasses import replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import modelfiles as mf
from use_search.config import Settings
from use_search.model.clip import build_clip, load_clip, read_clip_state
from use_search.model.dinov2 import load_dinov2
from use_search.segmenter.sam import build_sam, load_sam
from use_search.weights import (
    REGISTRY,
    ChecksumError,
    MissingWeightsError,
    UnreadableCheckpointError,
    fetch,
    resolve,
    safetensors_load,
    torch_load,
    torchscript_load,
    verify,
)

UNREADABLE = "is unreadable (truncated or not a checkpoint)"


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *a, **k):  # type: ignore[no-untyped-def]
            requests.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good files in the official formats, random weights."""
    return mf.official_files(tmp_path_factory.mktemp("official"))


def offline(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", offline=True)


# Registry, download, verify --------------------------------------------------------------------------


def test_fetch_downloads_verifies_and_caches(http_dir, tmp_path):
    root, base, _ = http_dir
    payload = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)
    (root / "model.bin").write_bytes(payload)
    spec = replace(REGISTRY["sam_vit_b"], filename="model.bin", url=f"{base}/model.bin",
                   sha256=hashlib.sha256(payload).hexdigest(), size_bytes=len(payload))
    settings = Settings(data_dir=tmp_path / "d")
    path = fetch(spec, settings, progress=False)
    assert path == settings.weights_path / "model.bin" and path.read_bytes() == payload
    assert verify(spec, settings)[0]
    assert list(settings.weights_path.iterdir()) == [path]  # no partial files left behind


@pytest.mark.parametrize("bad", ["sha256", "size"])
def test_fetch_rejects_wrong_checksum_or_size_and_keeps_nothing(http_dir, tmp_path, bad):
    root, base, _ = http_dir
    (root / "model.bin").write_bytes(b"tampered")
    spec = replace(REGISTRY["dinov2_vits14"], filename="model.bin", url=f"{base}/model.bin",
                   sha256="0" * 64 if bad == "sha256" else None, size_bytes=None if bad == "sha256" else 88_283_115)
    settings = Settings(data_dir=tmp_path / "d")
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        fetch(spec, settings, progress=False)
    assert not any(settings.weights_path.iterdir())


def test_fetch_offline_never_touches_the_network(http_dir, tmp_path):
    root, base, requests = http_dir
    (root / "model.bin").write_bytes(b"x" * 100)
    spec = replace(REGISTRY["sam_vit_b"], filename="model.bin", url=f"{base}/model.bin", sha256=None, size_bytes=None)
    with pytest.raises(MissingWeightsError, match="offline"):
        fetch(spec, offline(tmp_path), progress=False)
    with pytest.raises(MissingWeightsError, match="offline"):
        resolve("sam_vit_b", offline(tmp_path))
    assert requests == []


def test_dinov2_files_are_pinned_and_a_small_html_page_fails_verify(tmp_path):
    for name in ("dinov2_vits14", "dinov2_vitl14"):
        spec = REGISTRY[name]
        assert spec.size_bytes and spec.sha256 and len(spec.sha256) == 64
    assert REGISTRY["dinov2_vits14"].size_bytes == 88_283_115
    settings = offline(tmp_path)
    dest = settings.weights_path / REGISTRY["dinov2_vits14"].filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"<html>404</html>")  # 16 bytes
    ok, msg = verify(REGISTRY["dinov2_vits14"], settings)
    assert not ok and "checksum mismatch" in msg and "16 bytes" in msg and "88,283,115" in msg
    assert "use-search weights fetch dinov2_vits14" in msg


def test_every_registry_file_has_a_size_or_a_sha256():
    for spec in REGISTRY.values():
        assert spec.sha256 or spec.size_bytes, spec.name
        if spec.kind == "sam":
            assert spec.size_bytes and spec.sha256


def test_missing_checkpoint_offline_names_file_and_command(tmp_path):
    settings = offline(tmp_path)
    with pytest.raises(MissingWeightsError) as e:
        resolve("sam_vit_h", settings)
    msg = str(e.value)
    assert "sam_vit_h_4b8939.pth" in msg and str(settings.weights_path) in msg
    assert "use-search weights fetch sam_vit_h" in msg and REGISTRY["sam_vit_h"].url in msg


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="neither a file nor a known checkpoint"):
        resolve("sam_vit_q", Settings(data_dir=tmp_path))


def test_model_overrides_come_from_env_and_toml(tmp_path, monkeypatch):
    toml = tmp_path / "config.toml"
    toml.write_text('sam = "/models/sam.pth"\nclip = "ViT-B-16:/models/clip.pt"\n')
    monkeypatch.setenv("USE_SEARCH_CONFIG", str(toml))
    monkeypatch.setenv("USE_SEARCH_DINOV2", "dinov2_vits14")
    s = Settings()
    assert (s.sam, s.clip, s.dinov2) == ("/models/sam.pth", "ViT-B-16:/models/clip.pt", "dinov2_vits14")


# Corrupt files: one clear error for every loader -------------------------------------------------------


@pytest.mark.parametrize("variant", ["truncated", "html", "empty"])
def test_corrupt_files_are_unreadable_errors_for_every_loader(files, tmp_path, variant):
    cases = [
        (torch_load, files["sam"], "sam_vit_b_01ec64.pth", "sam_vit_b"),
        (torchscript_load, files["clip_torchscript"], "ViT-B-16.pt", "clip_vit_b16_openai"),
        (torch_load, files["clip_openai_sd"], "some_clip.pt", None),
        (safetensors_load, files["sam"], "weights.safetensors", None),
    ]
    for load, good, name, registry in cases:
        bad = mf.corrupt(good, variant, tmp_path / variant / name)
        with pytest.raises(UnreadableCheckpointError) as e:
            load(bad)
        msg = str(e.value)
        assert msg.startswith(f"checkpoint {bad} {UNREADABLE}: "), msg
        assert "weights_only" not in msg and "\n" not in msg
        if registry:
            assert f"re-fetch with `use-search weights fetch {registry}`" in msg


# SAM ---------------------------------------------------------------------------------------------------


def test_official_sam_state_dict_loads_by_path_with_its_identity(files, tmp_path):
    torch.manual_seed(1)
    ref = build_sam("tiny")
    sam, model_id = load_sam(str(files["sam"]), offline(tmp_path))
    digest = hashlib.sha256(files["sam"].read_bytes()).hexdigest()[:8]
    assert model_id == f"sam:tiny:sam_custom.pth-{digest}"
    for (k, a), (_, b) in zip(ref.state_dict().items(), sam.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_tiny_sam_under_an_official_name_is_not_loaded_as_that_model(files, tmp_path):
    settings = offline(tmp_path)
    cached = settings.weights_path / "sam_vit_b_01ec64.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(files["sam"].read_bytes())
    with pytest.raises(ValueError, match=r"holds a SAM tiny, not the vit_b that 'sam_vit_b' is: re-fetch"):
        load_sam("sam_vit_b", settings)
    # As a file, its own shapes decide, and the id says what it is.
    sam, model_id = load_sam(str(cached), settings)
    assert model_id.startswith("sam:tiny:sam_vit_b_01ec64.pth-") and len(sam.image_encoder.blocks) == 2


def test_a_clip_file_given_as_sam_is_a_clear_error(files, tmp_path):
    with pytest.raises(ValueError, match="not a segment-anything state dict"):
        load_sam(str(files["clip_openai_sd"]), offline(tmp_path))


# CLIP --------------------------------------------------------------------------------------------------


def _reference(seed: int):  # type: ignore[no-untyped-def]
    return mf._tiny_openai_clip(seed)


@pytest.mark.parametrize("fmt,seed", [("clip_torchscript", 3), ("clip_openai_sd", 4)])
def test_openai_formats_load_with_inferred_arch_and_embed_like_the_original(files, tmp_path, fmt, seed):
    ref = _reference(seed)
    if fmt == "clip_openai_sd":  # shipped in fp16, like OpenAI's
        ref.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    state, _ = read_clip_state(files[fmt])
    assert not {"input_resolution", "context_length", "vocab_size"} & set(state)
    bundle = load_clip(str(files[fmt]), offline(tmp_path))
    assert bundle.arch == "use-tiny-clip"
    digest = hashlib.sha256(files[fmt].read_bytes()).hexdigest()[:8]
    assert bundle.model_id == f"clip:use-tiny-clip:{files[fmt].name}-{digest}"
    tokens = bundle.tokenizer(["a red apple", "car's license plate"])
    image = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.encode_text(tokens), ref.encode_text(tokens), rtol=0, atol=1e-6)
        torch.testing.assert_close(bundle.model.encode_image(image), ref.encode_image(image), rtol=0, atol=1e-6)
    # ARCH:FILE names the architecture explicitly; same model, same id.
    again = load_clip(f"use-tiny-clip:{files[fmt]}", offline(tmp_path))
    assert again.model_id == bundle.model_id


def test_open_clip_checkpoint_loads_by_path_and_embeds_identically(tmp_path):
    torch.manual_seed(2)
    ref = build_clip("use-tiny-clip").eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    bundle = load_clip(str(path), offline(tmp_path), arch="use-tiny-clip")
    tokens = bundle.tokenizer(["a red apple"])
    with torch.no_grad():
        assert torch.equal(ref.encode_text(tokens), bundle.model.encode_text(tokens))
    assert bundle.model_id.startswith("clip:use-tiny-clip:open_clip_pytorch_model.bin-")


def test_clip_of_unknown_shape_says_to_pass_its_arch(files, tmp_path):
    with pytest.raises(ValueError, match=r"not an OpenAI / open_clip ViT CLIP state dict.*--clip ARCH:FILE"):
        load_clip(str(files["sam"]), offline(tmp_path))


# DINOv2 ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2_meta(tmp_path_factory):
    d = tmp_path_factory.mktemp("dinov2")
    state = mf.dinov2_meta_state()
    path = d / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    return path, state


def test_meta_dinov2_file_loads_by_path_and_by_name(dinov2_meta, tmp_path, one_torch_thread):
    import timm

    path, state = dinov2_meta
    settings = offline(tmp_path)
    bundle = load_dinov2(str(path), settings, grid=37)
    assert bundle.arch == "vit_small_patch14_dinov2"
    assert bundle.model_id.startswith("dinov2:vit_small_patch14_dinov2:dinov2_vits14_pretrain.pth-")
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518).eval()
    ref.load_state_dict({k: v for k, v in state.items() if k != "mask_token"})
    x = torch.rand(1, 3, 518, 518)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), ref(x), rtol=0, atol=1e-5)
    cached = settings.weights_path / "dinov2_vits14_pretrain.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    assert load_dinov2("dinov2_vits14", settings, grid=4).model_id == "dinov2_vits14"
    # A ViT-S/14 file under ViT-L/14's name is refused (no silent resize to another architecture).
    (settings.weights_path / "dinov2_vitl14_pretrain.pth").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="holds a DINOv2 vit_small_patch14_dinov2, not the vit_large_patch14_dinov2"):
        load_dinov2("dinov2_vitl14", settings, grid=4)
