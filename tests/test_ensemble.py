"""Voting with several models (paper A.2), the softmax scale a USE checkpoint was trained with (§4.2,
eq. 1) and the eval settings reported with the figures: checked against hand computations with two
real tiny-preset USE checkpoints (different seeds), through the library and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from use_search.config import Settings, VotingSettings, WeightedModel
from use_search.masks import mask_bbox
from use_search.model.checkpoint import UseConfig, read_use_config
from use_search.query.voting import (
    UNLABELED,
    Ensemble,
    EnsembleMember,
    combine_probabilities,
    load_ensemble,
    ovseg_exponents,
    read_label_png,
    training_logit_scale,
    vote,
)
from use_search.types import Segment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W = 48, 64
CLASSES = ["cat", "grass", "sky", "wall", "person", "car"]


def softmax_by_hand(seg: np.ndarray, txt: np.ndarray, scale: float) -> np.ndarray:
    """exp(scale · cos) / Σ exp(scale · cos), one row per segment, written out."""
    seg = seg / np.linalg.norm(seg, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    e = np.exp(scale * (seg.astype(np.float64) @ txt.astype(np.float64).T))
    return e / e.sum(axis=1, keepdims=True)


def vote_by_hand(masks: list[np.ndarray], probs: np.ndarray) -> np.ndarray:
    """Each pixel: the class with the largest sum of the probabilities of the segments covering it."""
    h, w = masks[0].shape
    out = np.full((h, w), UNLABELED, np.int64)
    total = np.zeros((h, w, probs.shape[1]))
    for m, p in zip(masks, probs):
        total[m] += p
    covered = np.any(masks, axis=0)
    out[covered] = total[covered].argmax(axis=1)
    return out


class TwoSegments:
    """The 2-segment example: a left block and a box overlapping it; the right edge stays uncovered."""

    def __init__(self) -> None:
        self.a = np.zeros((H, W), bool)
        self.a[:, :30] = True
        self.b = np.zeros((H, W), bool)
        self.b[8:40, 20:54] = True

    def segment(self, image: np.ndarray) -> list[Segment]:
        return [Segment(mask=m, bbox=mask_bbox(m), area=int(m.sum())) for m in (self.a, self.b)]


class CountingEmbedder:
    """Counts the calls into a real embedder (the ensemble must embed each image once per model)."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.model_id, self.dim, self.untrained, self.config = inner.model_id, inner.dim, inner.untrained, inner.config
        self.segment_calls = 0

    def embed_segments(self, image, segments):  # type: ignore[no-untyped-def]
        self.segment_calls += 1
        return self.inner.embed_segments(image, segments)

    def embed_texts(self, texts, templates=None):  # type: ignore[no-untyped-def]
        self.text_calls = getattr(self, "text_calls", 0) + 1
        return self.inner.embed_texts(texts, templates)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """Two USE checkpoints on the tiny preset (seeds 0 and 1) and a one-image semseg dataset."""
    from use_search.model.use import init_use_checkpoint

    root = tmp_path_factory.mktemp("ensemble")
    settings = Settings(data_dir=root / "data", preset="tiny", device="cpu", offline=True)
    a = init_use_checkpoint("tiny", settings, root / "curated.safetensors", seed=0)
    b = init_use_checkpoint("tiny", settings, root / "cocogt.safetensors", seed=1)
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rgb = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((W, H), Image.BICUBIC))
    Image.fromarray(rgb).save(root / "images" / "chelsea.png")
    gt = np.full((H, W), 3, np.uint8)  # "wall", with the cat on the left
    gt[:, :32] = 0
    gt[:2] = 255  # ignored
    Image.fromarray(gt).save(root / "labels" / "chelsea.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return {"root": root, "settings": settings, "a": a, "b": b, "rgb": rgb, "gt": gt}


def test_combine_probabilities_by_hand():
    pa = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    pb = np.array([[0.1, 0.8, 0.1], [0.3, 0.6, 0.1]])
    # (1·pa + 0.25·pb) / 1.25, computed on paper:
    np.testing.assert_allclose(combine_probabilities([pa, pb], [1.0, 0.25], "mean"), [[0.5, 0.4, 0.1], [0.22, 0.28, 0.5]], atol=1e-6)
    # weights 1 and 4: (pa + 4·pb) / 5 → the first segment flips from class 0 to class 1
    np.testing.assert_allclose(combine_probabilities([pa, pb], [1.0, 4.0], "mean"), [[0.2, 0.7, 0.1], [0.28, 0.52, 0.2]], atol=1e-6)
    # geometric: pa^0.8 · pb^0.2 (exponents w / Σw), renormalised
    g = pa ** 0.8 * pb ** 0.2
    np.testing.assert_allclose(combine_probabilities([pa, pb], [1.0, 0.25], "geometric"), g / g.sum(1, keepdims=True), atol=1e-6)
    # ovseg, the default: pa^(1-λ) · pb^λ with λ = 0.25, not renormalised; λ = 0.5: √(pa·pb)
    np.testing.assert_allclose(combine_probabilities([pa, pb], [1.0, 0.25]), pa ** 0.75 * pb ** 0.25, rtol=1e-6)
    np.testing.assert_allclose(combine_probabilities([pa, pb], [2.0, 1.0]), [[0.6 ** 0.5 * 0.1 ** 0.5, 0.3 ** 0.5 * 0.8 ** 0.5, 0.1],
                                                                             [0.2 ** 0.5 * 0.3 ** 0.5, 0.2 ** 0.5 * 0.6 ** 0.5, 0.6 ** 0.5 * 0.1 ** 0.5]], rtol=1e-6)
    for mode in ("ovseg", "mean", "geometric"):  # one model: itself
        np.testing.assert_allclose(combine_probabilities([pa], [0.3], mode), pa.astype(np.float32), rtol=1e-6)
    for bad in ([1.0, 0.0], [1.0, -0.5], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="positive"):
            combine_probabilities([pa, pb], bad)
    for bad in ([1.0, 1.0], [1.0, 4.0], [0.25, 1.0], [1.0, 0.5, 0.5]):  # the λ must sum below 1
        with pytest.raises(ValueError, match="sum below 1"):
            combine_probabilities([pa, pb, pa][: len(bad)], bad)
    with pytest.raises(ValueError, match="unknown ensemble combination"):
        combine_probabilities([pa, pb], [1, 1], "max")
    assert ovseg_exponents([1.0, 0.25]) == [0.75, 0.25] and ovseg_exponents([1.0, 0.2, 0.3]) == pytest.approx([0.5, 0.2, 0.3])


def test_the_three_combinations_label_a_shared_pixel_differently():
    """A.2's weights (curated model 1, COCO-GT model 0.25) on two segments that share one pixel: the
    three forms, summed per pixel as §4.3 votes, give three different labels there. By hand:

    mean:      (pa + 0.25·pb) / 1.25 per segment, summed: 0.60, 0.72, 0.68          → class 1
    geometric: pa^0.8 · pb^0.2 renormalised per segment, summed: 0.656, 0.654, 0.690 → class 2
    ovseg:     pa^0.75 · pb^0.25 per segment, summed: 0.583, 0.546, 0.530          → class 0
    """
    pa = np.array([[0.3, 0.6, 0.1], [0.2, 0.1, 0.7]])
    pb = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]])
    masks = np.zeros((2, 1, 3), bool)
    masks[0, 0, :2] = True  # segment 0: pixels 0, 1
    masks[1, 0, 1:] = True  # segment 1: pixels 1, 2 (pixel 1 shared)
    by_hand = {
        "mean": (pa + 0.25 * pb) / 1.25,
        "geometric": (pa ** 0.8 * pb ** 0.2) / (pa ** 0.8 * pb ** 0.2).sum(1, keepdims=True),
        "ovseg": pa ** 0.75 * pb ** 0.25,
    }
    sums = {"mean": [0.60, 0.72, 0.68], "geometric": [0.6561, 0.6537, 0.6902], "ovseg": [0.5834, 0.5460, 0.5304]}
    shared = {}
    for mode, expected in by_hand.items():
        combined = combine_probabilities([pa, pb], [1.0, 0.25], mode)
        np.testing.assert_allclose(combined, expected, rtol=1e-6)
        np.testing.assert_allclose(expected.sum(0), sums[mode], atol=1e-4)
        labels = vote(masks, combined)
        assert labels[0, 0] == expected[0].argmax() and labels[0, 2] == expected[1].argmax()
        shared[mode] = int(labels[0, 1])
    assert shared == {"mean": 1, "geometric": 2, "ovseg": 0}


def test_weighted_model_specs():
    assert WeightedModel.model_validate("m/curated.safetensors").weight == 1.0
    m = WeightedModel.model_validate("m/cocogt.safetensors:0.25")
    assert (m.path, m.weight) == (Path("m/cocogt.safetensors"), 0.25)
    assert WeightedModel.model_validate("C:\\m.safetensors").path == Path("C:\\m.safetensors")  # a drive, not a weight
    assert WeightedModel.model_validate({"path": "x", "weight": 0.7}).weight == 0.7
    with pytest.raises(ValueError):
        WeightedModel.model_validate("x.safetensors:0")
    # Settings take the list from TOML / env as strings.
    s = VotingSettings.model_validate({"models": ["a.safetensors", "b.safetensors:0.7"]})
    assert [(str(x.path), x.weight) for x in s.models] == [("a.safetensors", 1.0), ("b.safetensors", 0.7)]


def test_eval_semseg_two_checkpoints_is_the_weighted_combination(ckpts, tmp_path):
    """The must-show: eval semseg with the curated model at weight 1 and the COCO-GT model at 0.25
    (then 4) gives exactly the label map computed by hand from each model's own embeddings."""
    from use_search.eval import SemsegDataset, evaluate_semseg
    from use_search.model.use import load_use_embedder

    root, settings = ckpts["root"], ckpts["settings"]
    ds = SemsegDataset.from_folders(root / "images", root / "labels", root / "classes.txt")
    segmenter = TwoSegments()
    rgb = ckpts["rgb"]
    segs = segmenter.segment(rgb)

    # By hand: each model alone, its own text vectors (4 training templates), its training scale.
    probs = {}
    for key in ("a", "b"):
        e = load_use_embedder(ckpts[key], settings, "cpu")
        assert e.config.logit_scale == 30.0  # what init/training writes (the paper's τ)
        probs[key] = softmax_by_hand(e.embed_segments(rgb, segs), e.embed_texts(CLASSES, None), 30.0)

    results = {}
    for wb in (0.25, 4.0):
        s = settings.model_copy(update={"voting": VotingSettings(
            models=[f"{ckpts['a']}:1", f"{ckpts['b']}:{wb}"], combine="mean", templates="train4", fallback="none")})
        ensemble = load_ensemble(s)
        counted = [CountingEmbedder(m.embedder) for m in ensemble.members]
        ensemble = Ensemble([EnsembleMember(c, m.weight, source=m.source) for c, m in zip(counted, ensemble.members)], "mean")
        r = evaluate_semseg(ds, segmenter, ensemble, voting=s.voting, save_dir=tmp_path / f"pred{wb}")
        assert [c.segment_calls for c in counted] == [1, 1]  # one embedding pass per model per image
        combined = (1.0 * probs["a"] + wb * probs["b"]) / (1.0 + wb)
        expected = vote_by_hand([segmenter.a, segmenter.b], combined)
        pred = read_label_png((tmp_path / f"pred{wb}" / "chelsea.png").read_bytes())
        np.testing.assert_array_equal(pred, expected)

        # mIoU by hand over the scored pixels (unlabeled pixels are misses)
        gt = ckpts["gt"].astype(np.int64)
        valid = gt != 255
        ious = []
        for c in range(len(CLASSES)):
            tp = np.sum((pred == c) & (gt == c) & valid)
            union = np.sum(((pred == c) | (gt == c)) & valid)
            if union:
                ious.append(tp / union)
        out = r.to_json()
        assert out["mIoU"] == pytest.approx(100 * np.mean(ious))
        assert out["settings"]["models"] == [
            {"model": m.embedder.model_id, "checkpoint": str(p), "weight": w, "logit_scale": 30.0}
            for m, p, w in zip(ensemble.members, (ckpts["a"], ckpts["b"]), (1.0, wb))
        ]
        uncovered = int((~(segmenter.a | segmenter.b)).sum())
        assert out["per_image"] == [{"image": "chelsea.png", "segments": 2,
                                     "uncovered_pixels": uncovered, "unlabeled_pixels": uncovered}]
        results[wb] = pred
    # The weights decide: the two label maps differ (else this test could not tell weights apart).
    assert (results[0.25] != results[4.0]).any()
    # Each model alone differs from the ensemble of both in at least one of the two weightings.
    alone = vote_by_hand([segmenter.a, segmenter.b], probs["a"])
    assert (alone != results[4.0]).any()


def test_eval_parts_scores_are_the_combined_probabilities(ckpts):
    """Parts: a detection's score is the combined probability of its top class (the default
    combination, OVSeg's p₀^(1-λ) · p₁^λ with λ = 0.7)."""
    from use_search.eval import PartsDataset, evaluate_parts
    from use_search.masks import encode_rle

    root, settings = ckpts["root"], ckpts["settings"]
    coco = {
        "images": [{"id": 1, "file_name": "chelsea.png", "height": H, "width": W}],
        "categories": [{"id": i + 1, "name": n, "supercategory": "thing"} for i, n in enumerate(CLASSES[:3])],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": encode_rle(TwoSegments().a),
                         "area": int(TwoSegments().a.sum()), "bbox": list(mask_bbox(TwoSegments().a)), "iscrowd": 0}],
    }
    s = settings.model_copy(update={"voting": VotingSettings(
        models=[f"{ckpts['a']}:1", f"{ckpts['b']}:0.7"], templates="train4")})
    ensemble = load_ensemble(s)
    r = evaluate_parts(PartsDataset.load(root / "images", coco), TwoSegments(), ensemble,
                       background=CLASSES[3:], voting=s.voting)
    segs = TwoSegments().segment(ckpts["rgb"])
    p = [softmax_by_hand(m.embedder.embed_segments(ckpts["rgb"], segs), m.embedder.embed_texts(CLASSES, None), 30.0)
         for m in ensemble.members]
    combined = p[0] ** 0.3 * p[1] ** 0.7
    expected = [(int(t) + 1, combined[i, t]) for i, t in enumerate(combined.argmax(1)) if t < 3]
    assert [(d["category_id"], d["score"]) for d in r.detections] == [(c, pytest.approx(v, rel=1e-5)) for c, v in expected]
    assert r.to_json()["settings"]["models"][1]["weight"] == 0.7


def test_logit_scale_comes_from_the_checkpoint(ckpts, tmp_path):
    from use_search.factory import Runtime

    settings = ckpts["settings"]
    # A checkpoint written before the field existed reads as trained at 30 (all of them were).
    old = json.loads(read_use_config(ckpts["a"]).to_json())
    del old["logit_scale"]
    assert UseConfig.from_json(json.dumps(old)).logit_scale == 30.0
    use = load_ensemble(settings.model_copy(update={"use_checkpoint": ckpts["a"]}))
    assert [m.scale for m in use.members] == [30.0]
    crop = Runtime.from_settings(settings).embedder()  # no USE checkpoint: crop-CLIP keeps CLIP's 100
    assert training_logit_scale(crop) == 100.0
    assert [m.scale for m in use.with_logit_scale(55.0).members] == [55.0]  # --logit-scale overrides


def test_training_writes_its_scale_and_resumes(tmp_path):
    """A run at logit_scale 20 records 20 in every checkpoint, and resuming it still matches."""
    from use_search.train import DataSpec, TrainConfig, run
    from scenes import compose_scenes, real_backgrounds, real_cutouts

    compose_scenes(tmp_path / "scenes", 8, list(real_backgrounds().values())[:3], real_cutouts(), size=96, seed=5)
    settings = Settings(data_dir=tmp_path / "data", preset="tiny", device="cpu", offline=True)
    kw = dict(train=[DataSpec("folder", tmp_path / "scenes")], out_dir=tmp_path / "out", preset="tiny", workers=0,
              progress=False, epochs=1, batch_size=4, logit_scale=20.0, eval_at_start=False)
    first = run(TrainConfig(max_steps=1, **kw), settings)
    assert read_use_config(first.checkpoint).logit_scale == 20.0
    second = run(TrainConfig(resume=True, **kw), settings)
    assert second.step == 2 and read_use_config(second.checkpoint).logit_scale == 20.0
    assert read_use_config(tmp_path / "out" / "epoch-001.safetensors").logit_scale == 20.0


# ---------------------------------------------------------------------------------------------------
# The command line


def cli(args: list[str], data_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(data_dir), "COLUMNS": "200", "USE_SEARCH_CONFIG": "/nonexistent"}
    return subprocess.run([sys.executable, "-m", "use_search", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_cli_eval_semseg_ensemble_matches_hand_computation(ckpts, tmp_path):
    """`eval semseg --member A:1 --member B:0.25` with the tiny SAM and AMG flags: the predicted labels
    are the hand-combined vote (OVSeg's form, the default) over the same SAM segments, uncovered pixels
    left unlabeled (the default for eval); the JSON states models, scales, combination, templates,
    fallback and the automatic-mask settings."""
    from use_search.factory import Runtime
    from use_search.model.use import load_use_embedder

    root, settings = ckpts["root"], ckpts["settings"]
    r = cli(["--preset", "tiny", "eval", "semseg", str(root / "images"), str(root / "labels"),
             "--classes", str(root / "classes.txt"), "--member", f"{ckpts['a']}:1", "--member", f"{ckpts['b']}:0.25",
             "--templates", "train4", "--points-per-side", "4", "--pred-iou-thresh", "0.05",
             "--stability-thresh", "0", "--save-preds", str(tmp_path / "pred"), "--json"], tmp_path / "data")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    st = out["settings"]
    assert [(m["checkpoint"], m["weight"], m["logit_scale"]) for m in st["models"]] == [
        (str(ckpts["a"]), 1.0, 30.0), (str(ckpts["b"]), 0.25, 30.0)]
    assert (st["combine"], st["templates"], st["n_templates"], st["fallback"]) == ("ovseg", "train4", 4, "none")
    assert (st["amg"]["points_per_side"], st["amg"]["pred_iou_thresh"], st["amg"]["stability_score_thresh"]) == (4, 0.05, 0.0)
    assert "weight 0.25" in r.stderr and "UNTRAINED MODELS" in r.stderr

    amg = settings.amg.model_copy(update={"points_per_side": 4, "pred_iou_thresh": 0.05, "stability_score_thresh": 0.0})
    segmenter = Runtime.from_settings(settings.model_copy(update={"amg": amg})).segmenter()
    segs = segmenter.segment(ckpts["rgb"])
    assert segs and all(s.predicted_iou >= 0.05 for s in segs)  # the tiny SAM's random masks score ~0.1
    pa, pb = (softmax_by_hand(e.embed_segments(ckpts["rgb"], segs), e.embed_texts(CLASSES, None), 30.0)
              for e in (load_use_embedder(ckpts[k], settings, "cpu") for k in ("a", "b")))
    expected = vote_by_hand([s.mask for s in segs], pa ** 0.75 * pb ** 0.25)  # the default: OVSeg's form, λ = 0.25
    np.testing.assert_array_equal(read_label_png((tmp_path / "pred" / "chelsea.png").read_bytes()), expected)
    assert out["per_image"][0]["segments"] == len(segs)
    assert out["per_image"][0]["uncovered_pixels"] == int((expected == UNLABELED).sum())


def test_cli_voting_options_refuse_bad_input(ckpts, tmp_path):
    """Exit 2 with the reason, no traceback; all but the missing file fail before any model import."""
    root = ckpts["root"]
    base = ["--preset", "tiny", "eval", "semseg", str(root / "images"), str(root / "labels"), "--classes", str(root / "classes.txt")]
    for extra, message in [
        (["--member", str(tmp_path / "nope.safetensors") + ":0.7"], "nope.safetensors"),
        (["--member", f"{ckpts['a']}:-1"], "greater than 0"),
        (["--member", str(ckpts["a"]), "--member", f"{ckpts['a']}:0.5"], "same checkpoint twice"),
        (["--fallback", "zeros"], "fallback"),
        (["--combine", "max"], "combine"),
        (["--member", f"{ckpts['a']}:1", "--member", f"{ckpts['b']}:4"], "sum below 1"),
        # --model is the one global checkpoint: after a voting command it points to --member.
        (["--model", f"{ckpts['a']}:0.7"], "--member PATH[:WEIGHT]"),
        (["-m", str(ckpts["a"])], "--member PATH[:WEIGHT]"),
        (["--logit-scale", "0"], "logit_scale"),
    ]:
        r = cli(base + extra, tmp_path / "data")
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)


def test_cli_segment_with_an_ensemble_and_the_image_fallback(ckpts, tmp_path):
    """`segment` takes the same voting options; its label PNG is the library's segment_by_voting."""
    from use_search.factory import Runtime
    from use_search.query.voting import segment_by_voting

    root, settings = ckpts["root"], ckpts["settings"]
    image = root / "images" / "chelsea.png"
    r = cli(["--preset", "tiny", "segment", str(image), "--classes", "cat, grass,sky", "--member", str(ckpts["a"]),
             "--member", f"{ckpts['b']}:0.7", "--templates", "train4", "--fallback", "image", "-o", str(tmp_path / "l.png")],
            tmp_path / "data")
    assert r.returncode == 0, r.stderr
    labels = read_label_png((tmp_path / "l.png").read_bytes())
    voting = VotingSettings(models=[str(ckpts["a"]), f"{ckpts['b']}:0.7"], templates="train4", fallback="image")
    s = settings.model_copy(update={"voting": voting})
    votes = segment_by_voting(ckpts["rgb"], ["cat", "grass", "sky"], Runtime.from_settings(s).segmenter(), load_ensemble(s), voting)
    np.testing.assert_array_equal(labels, votes.labels)
    assert votes.uncovered_pixels > 0 and (labels != UNLABELED).all()  # the whole-image voter labels the gaps
    assert f"{votes.uncovered_pixels} pixels no segment covered (fallback: image)" in r.stderr

    r = cli(["--preset", "tiny", "segment", str(image), "--classes", " , "], tmp_path / "data")
    assert r.returncode == 2 and "at least one non-empty class name" in r.stderr


def test_http_segment_uses_the_configured_ensemble(ckpts, tmp_path):
    """`POST /segment` on a real server with `voting.models` set gives the library's ensemble vote on
    the image the worker sees (the upload at the segmenter's working size)."""
    import httpx

    from servers import api_server
    from use_search.imaging import decode_work
    from use_search.factory import Runtime
    from use_search.query.voting import segment_by_voting

    models = [f"{ckpts['a']}:1", f"{ckpts['b']}:0.25"]
    png = (ckpts["root"] / "images" / "chelsea.png").read_bytes()
    with api_server(tmp_path, USE_SEARCH_VOTING__MODELS=json.dumps(models), USE_SEARCH_VOTING__TEMPLATES="train4") as url:
        r = httpx.post(url + "/segment", data={"classes": ",".join(CLASSES)},
                       files={"file": ("chelsea.png", png, "image/png")}, timeout=600)
    assert r.status_code == 200, r.text
    got = read_label_png(__import__("base64").b64decode(r.json()["labels_png"]))

    settings = ckpts["settings"].model_copy(update={"voting": VotingSettings(models=models, templates="train4")})
    segmenter = Runtime.from_settings(settings).segmenter()
    work = decode_work(png, settings.api.max_pixels, segmenter.img_size)
    expected = segment_by_voting(work.pixels, CLASSES, segmenter, load_ensemble(settings), settings.voting).labels
    np.testing.assert_array_equal(got, expected)
    # Without the ensemble the server votes with its one embedder (crop-CLIP here): a different map,
    # so the equality above can tell the two apart.
    plain = segment_by_voting(work.pixels, CLASSES, segmenter, load_ensemble(ckpts["settings"]), settings.voting).labels
    assert (plain != expected).any()


def test_class_vectors_are_cached_per_class_list(ckpts):
    """A server answers the same class list again and again: the text towers run once per list."""
    from use_search.model.use import load_use_embedder

    counted = CountingEmbedder(load_use_embedder(ckpts["a"], ckpts["settings"], "cpu"))
    ens = Ensemble([EnsembleMember(counted)])
    first = ens.class_vectors(CLASSES, ["a photo of {}"])
    again = ens.with_logit_scale(50.0).class_vectors(CLASSES, ["a photo of {}"])
    assert counted.text_calls == 1
    np.testing.assert_array_equal(first[0], again[0])
    ens.class_vectors(CLASSES[:2], ["a photo of {}"])
    ens.class_vectors(CLASSES, None)
    assert counted.text_calls == 3  # another list, other templates: computed
