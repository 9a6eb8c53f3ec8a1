"""Open-vocabulary semantic segmentation eval (paper §4.3, Table 2): mIoU, pAcc, mAcc, per-class IoU.

Data in the ADE20K / Pascal-Context layout:

    images/     RGB photos (any format ``read_image`` reads), searched recursively
    labels/     one label PNG per image with the same relative stem: pixel = class index
    classes.txt one class name per line; line i is label i (after ``reduce_zero_label``)

ADE-150 and PC-59 as mmsegmentation ships them store 0 = "other / background" and 1..C = the classes:
pass ``reduce_zero_label=True`` (0 → ignore, v → v - 1), as mmsegmentation does for both.

Each image goes through SAM automatic masks → segment embeddings (every model of the ensemble) →
softmax over the class text embeddings → weighted combination → per-pixel vote (``voting``);
pixels no segment covers get the fallback (default ``none``: they stay unlabeled) and any pixel left
unlabeled counts as a miss. Confusion counts are pooled over all images (mmsegmentation's
convention); ``per_image`` reports each image's segments, uncovered and unlabeled pixels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from use_search.eval.common import (
    Progress,
    Timer,
    find_files,
    nan_to_none,
    read_class_list,
    read_label_map,
)
from use_search.config import VotingSettings
from use_search.eval.metrics import ConfusionMatrix, SemsegScores, check_ground_truth
from use_search.indexer.read import read_image
from use_search.model.base import Embedder
from use_search.voting.ensemble import Ensemble
from use_search.voting.png import label_png
from use_search.voting.predict import predict_labels
from use_search.types import Segmenter

# §4.3 says nothing of pixels no segment covers: by default they stay unlabeled and score as misses,
# the paper's protocol as written (``segment`` fills them instead, ``voting.vote.SEGMENT_FALLBACK``).
EVAL_FALLBACK = "none"


@dataclass
class SemsegDataset:
    pairs: list[tuple[Path, Path]]  # (image, label) in a stable order
    classes: list[str]
    ignore_index: int = 255
    reduce_zero_label: bool = False
    images_root: Path | None = None  # predictions are saved under their path relative to it

    @classmethod
    def from_folders(
        cls,
        images: Path,
        labels: Path,
        classes: Path | Sequence[str],
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        limit: int | None = None,
    ) -> "SemsegDataset":
        names = read_class_list(Path(classes)) if isinstance(classes, (str, Path)) else [c.strip() for c in classes]
        images, labels = Path(images).absolute(), Path(labels).absolute()  # find_files yields absolute paths
        label_files = {p.relative_to(labels).with_suffix(""): p for p in find_files(labels, (".png", ".tif", ".tiff"))}
        pairs, missing = [], []
        for img in find_files(images):
            key = img.relative_to(images).with_suffix("")
            lab = label_files.get(key)
            if lab is None:
                missing.append(str(img.relative_to(images)))
            else:
                pairs.append((img, lab))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) under {images} have no label PNG under {labels} "
                f"(same relative path, .png): {', '.join(missing[:3])}"
            )
        if not pairs:
            raise FileNotFoundError(f"no images under {images}")
        if limit is not None:
            pairs = pairs[:limit]
        return cls(pairs, names, ignore_index, reduce_zero_label, images)

    def relative(self, image: Path) -> Path:
        """The image's path under ``images_root`` (its name alone when outside it or unknown)."""
        try:
            return Path(image).absolute().relative_to(self.images_root) if self.images_root else Path(Path(image).name)
        except ValueError:
            return Path(Path(image).name)

    def load_label(self, path: Path) -> np.ndarray:
        """The label map as class indices; a value neither a class nor the ignore index is an error."""
        lab = read_label_map(path)
        if self.reduce_zero_label:
            lab = np.where(lab == 0, self.ignore_index, np.where(lab == self.ignore_index, lab, lab - 1))
        check_ground_truth(lab, len(self.classes), self.ignore_index, str(path), shift=int(self.reduce_zero_label))
        return lab


@dataclass
class SemsegResult:
    classes: list[str]
    scores: SemsegScores
    images: int
    segments: int
    seconds: float
    stage_seconds: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)  # what produced the figures (models, templates, ...)
    per_image: list[dict[str, Any]] = field(default_factory=list)  # image, segments, uncovered/unlabeled pixels

    @property
    def miou(self) -> float:
        return self.scores.miou

    def to_json(self) -> dict[str, Any]:
        """Figures in percent. ``unlabeled_pixels``: scored ground-truth pixels left without a label
        (misses); ``uncovered_pixels``: pixels of all images no segment covered (the fallback's work)."""
        s = self.scores
        return {
            "mIoU": nan_to_none(s.miou),
            "pAcc": nan_to_none(s.pacc),
            "mAcc": nan_to_none(s.macc),
            "images": self.images,
            "segments": self.segments,
            "unlabeled_pixels": s.unlabeled_pixels,
            "uncovered_pixels": sum(int(r["uncovered_pixels"]) for r in self.per_image),
            "seconds": self.seconds,
            "stage_seconds": self.stage_seconds,
            "settings": self.settings,
            "per_image": self.per_image,
            "per_class": [
                {
                    "class": name, "IoU": nan_to_none(s.iou[i]), "Acc": nan_to_none(s.acc[i]),
                    "gt_pixels": int(s.gt_pixels[i]), "pred_pixels": int(s.pred_pixels[i]),
                }
                for i, name in enumerate(self.classes)
            ],
        }


def evaluate_semseg(
    dataset: SemsegDataset,
    segmenter: Segmenter,
    models: Embedder | Ensemble,
    *,
    voting: VotingSettings | None = None,
    save_dir: Path | None = None,
    max_image_pixels: int = 50_000_000,
    on_image: Progress | None = None,
) -> SemsegResult:
    """Run §4.3 voting (templates, softmax scale and fallback from ``voting``) on every image with the
    model(s) given (an embedder, or an ``Ensemble`` from ``factory.load_ensemble``) and score it
    against its label map."""
    from use_search.model.text import template_set

    started = time.perf_counter()
    v = voting or VotingSettings()
    fallback = v.fallback or EVAL_FALLBACK
    ens = Ensemble.of(models).with_logit_scale(v.logit_scale)
    templates = template_set(v.templates)
    timer = Timer()
    class_vectors = ens.class_vectors(dataset.classes, templates)
    timer.add("text", started)
    cm = ConfusionMatrix(len(dataset.classes), dataset.ignore_index)
    n_segments = 0
    per_image: list[dict[str, Any]] = []
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
    for i, (img_path, lab_path) in enumerate(dataset.pairs):
        t = time.perf_counter()
        pixels = read_image(img_path, max_image_pixels).pixels
        gt = dataset.load_label(lab_path)
        timer.add("decode", t)
        if gt.shape != pixels.shape[:2]:
            raise ValueError(
                f"{lab_path}: label is {gt.shape[1]}×{gt.shape[0]}, image {img_path} is "
                f"{pixels.shape[1]}×{pixels.shape[0]} (after EXIF orientation)"
            )
        votes = predict_labels(pixels, segmenter, ens, class_vectors, fallback=fallback, timer=timer)
        n_segments += votes.segments
        per_image.append({
            "image": str(dataset.relative(img_path)), "segments": votes.segments,
            "uncovered_pixels": votes.uncovered_pixels, "unlabeled_pixels": votes.unlabeled_pixels,
        })
        t = time.perf_counter()
        cm.update(votes.labels, gt, source=str(lab_path))
        timer.add("score", t)
        if save_dir is not None:
            dest = save_dir / dataset.relative(img_path).with_suffix(".png")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(label_png(votes.labels))
        if on_image:
            on_image(i + 1, len(dataset.pairs), img_path.name)
    settings = {
        "models": ens.describe(), "combine": ens.combine, "templates": v.templates, "n_templates": len(templates),
        "fallback": fallback,
    }
    return SemsegResult(
        dataset.classes, cm.scores(), len(dataset.pairs), n_segments, time.perf_counter() - started, timer.seconds,
        settings, per_image,
    )
