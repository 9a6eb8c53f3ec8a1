"""USE's fast paths against the implementations they replaced (kept here as references): CLIP blocks
through SDPA, the folded multi-level merge, pooling before the merge, and several images per
backbone forward (``UseEmbedder.embed_batch``). Tiny preset, CPU, fp32: agreement to ~1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock

from modelfiles import randomize
from use_search.config import Settings
from use_search.model.backbones import BackboneFeatures, clip_block
from use_search.model.use import MultiLevelMerge, UseEmbedder, UseModel, build_use_model, load_use_model
from use_search.masks import mask_bbox
from use_search.model.crop_clip import CropClipEmbedder
from use_search.presets import get_preset
from use_search.types import Segment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = get_preset("tiny")

# The trainable state dict as the code before the folded merge wrote it (tiny preset): names and
# shapes of a USE checkpoint must stay loadable.
OLD_TINY_STATE = {
    "clip_merge.scale": (2,), "clip_merge.lln.0.0.weight": (64,), "clip_merge.lln.0.0.bias": (64,),
    "clip_merge.lln.0.1.weight": (64, 64), "clip_merge.lln.0.1.bias": (64,), "clip_merge.lln.1.0.weight": (64,),
    "clip_merge.lln.1.0.bias": (64,), "clip_merge.lln.1.1.weight": (64, 64), "clip_merge.lln.1.1.bias": (64,),
    "dino_merge.scale": (2,), "dino_merge.lln.0.0.weight": (64,), "dino_merge.lln.0.0.bias": (64,),
    "dino_merge.lln.0.1.weight": (64, 64), "dino_merge.lln.0.1.bias": (64,), "dino_merge.lln.1.0.weight": (64,),
    "dino_merge.lln.1.0.bias": (64,), "dino_merge.lln.1.1.weight": (64, 64), "dino_merge.lln.1.1.bias": (64,),
    "head.weight": (64, 256), "head.bias": (64,),
}


# ---------------------------------------------------------------------------------------------------
# The replaced implementations


def reference_clip_forward(bb, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbones.clip_forward before SDPA: open_clip's own blocks (nn.MultiheadAttention)."""
    v = bb.clip_visual
    x = v.conv1(x).flatten(2).transpose(1, 2)
    cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = v.ln_pre(torch.cat([cls, x], dim=1) + bb.clip_pos.to(x.dtype))
    blocks = []
    for block in v.transformer.resblocks:
        x = block(x)
        blocks.append(x)
    return torch.stack([b[:, 1:] for b in blocks]), v.ln_post(blocks[-1][:, 0]) @ v.proj


def reference_merge(merge: MultiLevelMerge, tokens: torch.Tensor) -> torch.Tensor:
    """MultiLevelMerge.forward before folding: one LLN module per block, scaled and summed."""
    out = merge.scale[0] * merge.lln[0](tokens[0])
    for i in range(1, len(merge.lln)):
        out = out + merge.scale[i] * merge.lln[i](tokens[i])
    return out


def reference_trainable(trainable, feats: BackboneFeatures, weights: torch.Tensor) -> torch.Tensor:
    """UseTrainable.forward before pooling-first: z for every patch, weighted average, head."""
    c_bar = reference_merge(trainable.clip_merge, feats.clip_blocks)
    d_bar = reference_merge(trainable.dino_merge, feats.dino_blocks)
    b, p, _ = c_bar.shape
    z = torch.cat([c_bar, feats.clip_cls[:, None].expand(b, p, -1), d_bar, feats.dino_cls[:, None].expand(b, p, -1)], -1)
    pooled = torch.bmm(weights, z) / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return F.normalize(trainable.head(pooled), dim=-1)


# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> UseModel:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), preset="tiny", device="cpu", offline=True)
    return randomize(build_use_model(TINY, settings)).eval()


def blob_segments(shape: tuple[int, int], n: int, seed: int) -> list[Segment]:
    """Ellipses plus one scattered-pixel mask (fractional weights in every patch)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    masks = [rng.random(shape) < 0.05]
    for _ in range(n - 1):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, h / 2), rng.uniform(3, w / 2)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        m[min(int(cy), h - 1), min(int(cx), w - 1)] = True
        masks.append(m)
    return [Segment(mask=m, bbox=mask_bbox(m), area=int(m.sum()), rle={}) for m in masks]


@pytest.mark.parametrize("width,heads,tokens,batch", [(64, 2, 65, 2), (128, 4, 300, 1)])
def test_clip_block_matches_open_clip_block(width, heads, tokens, batch):
    torch.manual_seed(0)
    block = ResidualAttentionBlock(width, heads, act_layer=QuickGELU).eval()
    x = torch.randn(batch, tokens, width)
    with torch.inference_mode():  # open_clip's block takes nn.MultiheadAttention's fast path here
        want, got = block(x), clip_block(block, x)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-5


def test_clip_forward_matches_reference(model):
    bb = model.backbones
    clip_x, _ = bb.tower_inputs(torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3)))
    with torch.inference_mode():
        blocks, cls = bb.clip_forward(clip_x)
        ref_blocks, ref_cls = reference_clip_forward(bb, clip_x)
    assert blocks.shape == ref_blocks.shape == (2, 2, 64, 64)  # (m, B, P, Wc)
    assert (blocks - ref_blocks).abs().max() < 1e-5
    assert (cls - ref_cls).abs().max() < 1e-5


def test_merge_and_pooled_forward_match_reference(model):
    g = torch.Generator().manual_seed(4)
    feats = model.backbones(torch.rand(3, 3, 128, 128, generator=g))
    tr = model.trainable
    with torch.no_grad():
        for merge, tokens in ((tr.clip_merge, feats.clip_blocks), (tr.dino_merge, feats.dino_blocks)):
            assert (merge(tokens) - reference_merge(merge, tokens)).abs().max() < 1e-5
        weights = torch.rand(3, 5, 64, generator=g) * (torch.rand(3, 5, 64, generator=g) < 0.3)
        weights[1, 4] = 0  # a padding row
        got = tr(feats, weights)
        want = reference_trainable(tr, feats, weights)
    assert (got[0] - want[0]).abs().max() < 1e-5
    assert (got[1, :4] - want[1, :4]).abs().max() < 1e-5
    assert (got[2] - want[2]).abs().max() < 1e-5
    assert torch.equal(got[1, 4], torch.zeros(64))  # padding rows are zeros, as documented
    assert torch.allclose(got[0].norm(dim=-1), torch.ones(5), atol=1e-6)


def test_training_gradients_match_reference(model):
    """Training runs the same modules: the folded merge must give the old gradients too."""
    g = torch.Generator().manual_seed(5)
    feats = model.backbones(torch.rand(2, 3, 128, 128, generator=g))
    weights = torch.rand(2, 4, 64, generator=g)
    target = F.normalize(torch.randn(2, 4, 64, generator=g), dim=-1)
    tr = model.trainable
    grads = []
    for forward in (lambda: tr(feats, weights), lambda: reference_trainable(tr, feats, weights)):
        tr.zero_grad()
        ((forward() - target) ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tr.named_parameters()})
    tr.zero_grad()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(OLD_TINY_STATE)
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_checkpoint_keys_unchanged_and_old_state_loads(model, tmp_path):
    """A checkpoint of the old layout (per-block LLN modules) loads strictly and embeds as the old
    code computed it."""
    state = model.trainable.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == OLD_TINY_STATE
    path = model.save(tmp_path / "use.safetensors")
    loaded = load_use_model(path, Settings(data_dir=tmp_path / "d", preset="tiny", offline=True))
    feats = model.backbones(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(6)))
    weights = torch.rand(1, 3, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (loaded.trainable(feats, weights) - reference_trainable(model.trainable, feats, weights)).abs().max() < 1e-5


def test_embed_batch_equals_per_image(model, voc):
    """Images of different sizes (different letterbox sides) in one forward, chunked at 2 images,
    with an image without segments in the middle: each gets what embed_segments gives it alone."""
    rng = np.random.default_rng(8)
    images = [voc["rgb"], rng.integers(0, 256, (90, 130, 3), dtype=np.uint8),
              rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (200, 150, 3), dtype=np.uint8)]
    segments = [[Segment(mask=m, bbox=mask_bbox(m), area=int(m.sum()), rle={}) for m in voc["masks"]],
                blob_segments((90, 130), 5, 1), [], blob_segments((200, 150), 3, 2)]
    embedder = UseEmbedder(model, batch=2)
    got = embedder.embed_batch(images, segments)
    assert [g.shape for g in got] == [(len(s), 64) for s in segments]
    assert all(g.dtype == np.float32 for g in got)
    for image, segs, g in zip(images, segments, got):
        alone = embedder.embed_segments(image, segs)
        assert alone.shape == g.shape and (not segs or np.abs(g - alone).max() < 1e-5)
        if segs:  # and what the replaced code computed for this image alone
            from use_search.model.geometry import letterbox

            w = embedder.patch_weights(image.shape[:2], segs)[None]
            with torch.no_grad():
                feats = model.backbones(letterbox(image, 8, model.clip.mean)[None])
                ref = reference_trainable(model.trainable, feats, w)[0].numpy()
            assert np.abs(g - ref).max() < 1e-5
    # The rows differ between segments and images: no copy of one image's result into another.
    assert np.abs(got[0][0] - got[1][0]).max() > 1e-3


def test_embed_batch_names_the_bad_image(model):
    image = np.zeros((64, 64, 3), np.uint8)
    good = blob_segments((64, 64), 2, 3)
    empty = Segment(mask=np.zeros((64, 64), bool), bbox=(0, 0, 0, 0), area=0, rle={})
    with pytest.raises(ValueError, match="image 1: segment 1 has an empty mask"):
        UseEmbedder(model).embed_batch([image, image], [good, [good[0], empty]])
    with pytest.raises(ValueError, match="2 images but 1 segment lists"):
        UseEmbedder(model).embed_batch([image, image], [good])


def test_crop_clip_embed_batch_equals_per_image(model, voc):
    """crop-CLIP's cross-image crop batches give each image its per-image result."""
    rng = np.random.default_rng(9)
    images = [voc["rgb"], rng.integers(0, 256, (90, 130, 3), dtype=np.uint8), rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)]
    segments = [[Segment(mask=m, bbox=mask_bbox(m), area=int(m.sum()), rle={}) for m in voc["masks"][:5]],
                [], blob_segments((64, 80), 4, 4)]
    crop = CropClipEmbedder(model.clip, batch=3)
    got = crop.embed_batch(images, segments)
    assert [g.shape for g in got] == [(5, 64), (0, 64), (4, 64)]
    for image, segs, g in zip(images, segments, got):
        alone = crop.embed_segments(image, segs)
        assert alone.shape == g.shape and (not segs or np.abs(g - alone).max() < 1e-5)


def test_pipelined_index_with_use_batches_equals_sequential(photos, tmp_path):
    """The indexer's pipelined runner hands USE several images per embed_batch call: the stored
    points equal the sequential runner's (one embed_segments call per image)."""
    from use_search.factory import Runtime
    from use_search.indexer.runner import Indexer
    from use_search.model.use import init_use_checkpoint
    from use_search.store import EdgeStore

    base = Settings(data_dir=tmp_path / "data", preset="tiny", device="cpu", offline=True)
    ckpt = init_use_checkpoint("tiny", base, tmp_path / "use-tiny.safetensors", seed=3)
    rt = Runtime.from_settings(base.model_copy(update={"use_checkpoint": ckpt}))
    segmenter, embedder = rt.segmenter(), rt.embedder()
    assert isinstance(embedder, UseEmbedder)
    calls = []
    embed_batch = embedder.embed_batch
    embedder.embed_batch = lambda images, segments: calls.append(len(images)) or embed_batch(images, segments)

    points = {}
    for pipeline in (False, True):
        with EdgeStore(tmp_path / f"store-{pipeline}", "segments") as store:
            report = Indexer(store, segmenter, embedder, pipeline=pipeline, image_batch=3).index(photos["voc"].parent)
            assert report.indexed == 4 and not report.failed and report.segments >= 4
            points[pipeline] = {}
            for hit in store.scroll_segments():
                vector = store._segments.retrieve([hit.id], False, True)[0].vector
                vector = next(iter(vector.values())) if isinstance(vector, dict) else vector
                points[pipeline][hit.id] = (hit.path, hit.segment_index, np.asarray(vector, np.float32))
    assert max(calls) == 3  # the pipelined run batched three images into one USE forward
    assert points[True].keys() == points[False].keys() and len(points[True]) == report.segments
    for pid, (path, index, vector) in points[False].items():
        assert points[True][pid][:2] == (path, index)
        assert np.abs(points[True][pid][2] - vector).max() < 1e-5
