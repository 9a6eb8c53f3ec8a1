"""Weights registry: download over real HTTP (127.0.0.1), checksums, offline errors, loading official formats."""

import hashlib
import threading
from dataclasses import replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from use_search.config import Settings
from use_search.model.clip import build_clip, load_clip
from use_search.segmenter.sam import build_sam, load_sam
from use_search.weights import REGISTRY, ChecksumError, MissingWeightsError, fetch, resolve, verify


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_downloads_verifies_and_caches(http_dir, tmp_path):
    root, base = http_dir
    payload = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)
    (root / "model.bin").write_bytes(payload)
    spec = replace(REGISTRY["sam_vit_b"], filename="model.bin", url=f"{base}/model.bin",
                   sha256=hashlib.sha256(payload).hexdigest())
    settings = Settings(data_dir=tmp_path / "d")
    path = fetch(spec, settings, progress=False)
    assert path == settings.weights_path / "model.bin" and path.read_bytes() == payload
    assert verify(spec, settings)[0]
    assert list(settings.weights_path.iterdir()) == [path]  # no partial files left behind


def test_fetch_rejects_wrong_checksum_and_keeps_nothing(http_dir, tmp_path):
    root, base = http_dir
    (root / "model.bin").write_bytes(b"tampered")
    spec = replace(REGISTRY["sam_vit_b"], filename="model.bin", url=f"{base}/model.bin", sha256="0" * 64)
    settings = Settings(data_dir=tmp_path / "d")
    with pytest.raises(ChecksumError):
        fetch(spec, settings, progress=False)
    assert not any(settings.weights_path.iterdir())


def test_missing_checkpoint_offline_names_file_and_command(tmp_path):
    settings = Settings(data_dir=tmp_path / "d", offline=True)
    with pytest.raises(MissingWeightsError) as e:
        resolve("sam_vit_h", settings)
    msg = str(e.value)
    assert "sam_vit_h_4b8939.pth" in msg and str(settings.weights_path) in msg
    assert "use-search weights fetch sam_vit_h" in msg and REGISTRY["sam_vit_h"].url in msg


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="neither a file nor a known checkpoint"):
        resolve("sam_vit_q", Settings(data_dir=tmp_path))


def test_official_sam_state_dict_loads_by_path(tmp_path):
    torch.manual_seed(1)
    ref = build_sam("tiny")
    path = tmp_path / "sam_custom.pth"
    torch.save(ref.state_dict(), path)  # segment-anything publishes plain state dicts
    sam, model_id = load_sam(str(path), Settings(data_dir=tmp_path, offline=True))
    assert model_id == "sam:sam_custom.pth"
    for (k, a), (_, b) in zip(ref.state_dict().items(), sam.state_dict().items()):
        assert torch.equal(a, b), k


def test_open_clip_checkpoint_loads_by_path_and_embeds_identically(tmp_path):
    torch.manual_seed(2)
    ref = build_clip("use-tiny-clip").eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    bundle = load_clip(str(path), Settings(data_dir=tmp_path, offline=True), arch="use-tiny-clip")
    tokens = bundle.tokenizer(["a red apple"])
    with torch.no_grad():
        assert torch.equal(ref.encode_text(tokens), bundle.model.encode_text(tokens))
    assert bundle.model_id == "clip:use-tiny-clip:open_clip_pytorch_model.bin"
