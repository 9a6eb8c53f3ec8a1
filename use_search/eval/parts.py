"""Open-vocabulary part segmentation eval (paper §4.4, Table 3): mask mAP@[.5:.95] with COCOeval.

Data: an image folder plus COCO-format instance annotations of the part classes (PartImageNet ships
exactly that: 40 part categories, each with its super-category).

Every image's SAM automatic masks are embedded and classified by a softmax over the part classes *plus*
background classes (by default the 91 COCO-stuff classes and the super-categories of the part
categories: PartImageNet's 11). Because the grid prompts mostly hit whole objects and background, only
the masks whose most probable class is a part are kept as detections: category = that part, score =
its probability. Those detections are scored with ``pycocotools.cocoeval.COCOeval(iouType="segm")``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from use_search.config import VotingSettings
from use_search.eval.common import Progress, Timer, nan_to_none
from use_search.eval.metrics import MaskAP, coco_from_dataset, mask_map
from use_search.indexer.read import read_image
from use_search.model.base import Embedder
from use_search.voting.ensemble import Ensemble
from use_search.voting.predict import segment_and_classify
from use_search.types import Segmenter

# The 91 stuff classes of COCO-Stuff (Caesar et al. 2018), ids 92-182, with their "-other" / "-stuff"
# suffixes dropped, "floor-wood" read as "wood floor", hyphens as spaces: plain names for the text tower.
COCO_STUFF_RAW = (
    "banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other "
    "ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence "
    "floor-marble floor-other floor-stone floor-tile floor-wood flower fog food-other fruit "
    "furniture-other grass gravel ground-other hill house leaves light mat metal mirror-stuff moss "
    "mountain mud napkin net paper pavement pillow plant-other plastic platform playingfield railing "
    "railroad river road rock roof rug salad sand sea shelf sky-other skyscraper snow solid-other "
    "stairs stone straw structural-other table tent textile-other towel tree vegetable wall-brick "
    "wall-concrete wall-other wall-panel wall-stone wall-tile wall-wood water-other waterdrops "
    "window-blind window-other wood"
).split()


def _plain(name: str) -> str:
    for suffix in ("-other", "-stuff"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    head, _, material = name.partition("-")
    if head in ("floor", "wall") and material:  # "wall-brick" → "brick wall"
        return f"{material} {head}"
    return {"playingfield": "playing field", "waterdrops": "water drops"}.get(name, name.replace("-", " "))


COCO_STUFF_CLASSES: tuple[str, ...] = tuple(_plain(n) for n in COCO_STUFF_RAW)
# PartImageNet's super-categories (the 11 objects whose 40 parts are annotated).
PARTIMAGENET_SUPERCATEGORIES = (
    "Quadruped", "Biped", "Fish", "Bird", "Snake", "Reptile", "Car", "Bicycle", "Boat", "Aeroplane", "Bottle",
)


def default_background_classes(categories: Sequence[dict[str, Any]]) -> list[str]:
    """COCO-stuff's 91 classes + the distinct super-categories of the part categories (paper §4.4)."""
    supers = []
    for c in categories:
        s = str(c.get("supercategory") or "").strip()
        if s and s not in supers:
            supers.append(s)
    return list(COCO_STUFF_CLASSES) + supers


@dataclass
class PartsDataset:
    images_dir: Path
    coco: Any  # pycocotools.coco.COCO
    img_ids: list[int]

    @classmethod
    def load(cls, images_dir: Path, annotations: Path | dict[str, Any], limit: int | None = None) -> "PartsDataset":
        data = annotations if isinstance(annotations, dict) else json.loads(Path(annotations).read_text())
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"annotations are not COCO format: no '{key}'")
        coco = coco_from_dataset(data)
        ids = sorted(coco.getImgIds())
        if limit is not None:
            ids = ids[:limit]
        missing = [coco.imgs[i]["file_name"] for i in ids if not (Path(images_dir) / coco.imgs[i]["file_name"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} annotated image(s) are not under {images_dir}: {', '.join(missing[:3])}"
            )
        return cls(Path(images_dir), coco, ids)

    @property
    def categories(self) -> list[dict[str, Any]]:
        return [self.coco.cats[c] for c in sorted(self.coco.getCatIds())]


@dataclass
class PartsResult:
    ap: MaskAP
    part_names: dict[int, str]  # category id → name (the text queried)
    background: list[str]
    images: int
    segments: int  # SAM masks classified
    seconds: float
    stage_seconds: dict[str, float]
    detections: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)  # what produced the figures (models, templates, ...)

    @property
    def map(self) -> float:
        return self.ap.map

    def to_json(self, with_detections: bool = False) -> dict[str, Any]:
        out = {
            "mAP": nan_to_none(self.ap.map),
            "AP50": nan_to_none(self.ap.ap50),
            "AP75": nan_to_none(self.ap.ap75),
            "images": self.images,
            "segments": self.segments,
            "detections": self.ap.n_detections,
            "background_classes": len(self.background),
            "seconds": self.seconds,
            "stage_seconds": self.stage_seconds,
            "settings": self.settings,
            "per_class": [
                {"category_id": c, "class": self.part_names[c], "AP": nan_to_none(v)} for c, v in self.ap.per_class.items()
            ],
        }
        if with_detections:
            out["detection_list"] = self.detections
        return out


def part_detections(
    image_id: int,
    segments: Sequence[Any],
    probs: np.ndarray,
    part_cat_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """COCO result dicts for the segments whose top class is a part. ``probs`` columns: the parts (in
    ``part_cat_ids`` order) first, then the background classes."""
    n_parts = len(part_cat_ids)
    out = []
    if len(segments) == 0:
        return out
    top = probs.argmax(axis=1)
    for seg, t, p in zip(segments, top, probs):
        if t < n_parts:
            out.append({
                "image_id": int(image_id), "category_id": int(part_cat_ids[t]),
                "segmentation": dict(seg.rle), "score": float(p[t]),
            })
    return out


def evaluate_parts(
    dataset: PartsDataset,
    segmenter: Segmenter,
    models: Embedder | Ensemble,
    *,
    background: Sequence[str] | None = None,
    voting: VotingSettings | None = None,
    max_image_pixels: int = 50_000_000,
    max_dets: int = 100,
    on_image: Progress | None = None,
) -> PartsResult:
    """Classify every SAM mask with the model(s) (templates and softmax scale from ``voting``; the
    ensemble's combined probabilities), keep the part-topped ones as detections, score with COCOeval."""
    from use_search.model.text import template_set

    started = time.perf_counter()
    v = voting or VotingSettings()
    ens = Ensemble.of(models).with_logit_scale(v.logit_scale)
    templates = template_set(v.templates)
    timer = Timer()
    cats = dataset.categories
    part_ids = [int(c["id"]) for c in cats]
    part_names = {int(c["id"]): str(c["name"]) for c in cats}
    bg = list(background) if background is not None else default_background_classes(cats)
    lower_parts = {n.lower() for n in part_names.values()}
    bg = [b for b in dict.fromkeys(b.strip() for b in bg) if b and b.lower() not in lower_parts]
    class_vectors = ens.class_vectors([part_names[c] for c in part_ids] + bg, templates)
    timer.add("text", started)
    detections: list[dict[str, Any]] = []
    n_segments = 0
    for i, img_id in enumerate(dataset.img_ids):
        info = dataset.coco.imgs[img_id]
        t = time.perf_counter()
        pixels = read_image(dataset.images_dir / info["file_name"], max_image_pixels).pixels
        timer.add("decode", t)
        h, w = pixels.shape[:2]
        if (info.get("height"), info.get("width")) != (h, w):
            raise ValueError(
                f"{info['file_name']}: annotations say {info.get('width')}×{info.get('height')}, "
                f"the image is {w}×{h}"
            )
        segments, probs = segment_and_classify(pixels, segmenter, ens, class_vectors, timer)
        n_segments += len(segments)
        detections += part_detections(img_id, segments, probs, part_ids)
        if on_image:
            on_image(i + 1, len(dataset.img_ids), info["file_name"])
    t = time.perf_counter()
    ap = mask_map(dataset.coco, detections, cat_ids=part_ids, img_ids=dataset.img_ids, max_dets=max_dets)
    timer.add("cocoeval", t)
    # "fallback": mask AP scores SAM's masks themselves, so no uncovered pixel is ever filled.
    settings = {"models": ens.describe(), "combine": ens.combine, "templates": v.templates, "n_templates": len(templates),
                "fallback": "none"}
    return PartsResult(
        ap, part_names, bg, len(dataset.img_ids), n_segments, time.perf_counter() - started, timer.seconds, detections,
        settings,
    )
