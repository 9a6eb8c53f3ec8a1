"""Open-vocabulary semantic segmentation eval (paper §4.3, Table 2): mIoU, pAcc, mAcc, per-class IoU.

Data in the ADE20K / Pascal-Context layout:

    images/     RGB photos (any format ``read_image`` reads), searched recursively
    labels/     one label PNG per image with the same relative stem: pixel = class index
    classes.txt one class name per line; line i is label i (after ``reduce_zero_label``)

ADE-150 and PC-59 as mmsegmentation ships them store 0 = "other / background" and 1..C = the classes:
pass ``reduce_zero_label=True`` (0 → ignore, v → v - 1), as mmsegmentation does for both.

Each image goes through SAM automatic masks → segment embeddings → softmax over the class text
embeddings → per-pixel vote (``query.voting.vote``); pixels no segment covers are unlabeled, which
counts as a miss. Confusion counts are pooled over all images (mmsegmentation's convention).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
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
from use_search.eval.metrics import ConfusionMatrix, SemsegScores
from use_search.indexer.read import read_image
from use_search.model.base import Embedder
from use_search.query.voting import DEFAULT_LOGIT_SCALE, label_png, predict_labels
from use_search.types import Segmenter


@dataclass
class SemsegDataset:
    pairs: list[tuple[Path, Path]]  # (image, label) in a stable order
    classes: list[str]
    ignore_index: int = 255
    reduce_zero_label: bool = False

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
        images, labels = Path(images), Path(labels)
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
        return cls(pairs, names, ignore_index, reduce_zero_label)

    def load_label(self, path: Path) -> np.ndarray:
        lab = read_label_map(path)
        if self.reduce_zero_label:
            lab = np.where(lab == 0, self.ignore_index, np.where(lab == self.ignore_index, lab, lab - 1))
        return lab


@dataclass
class SemsegResult:
    classes: list[str]
    scores: SemsegScores
    images: int
    segments: int
    seconds: float
    stage_seconds: dict[str, float]

    @property
    def miou(self) -> float:
        return self.scores.miou

    def to_json(self) -> dict[str, Any]:
        s = self.scores
        return {
            "mIoU": nan_to_none(s.miou),
            "pAcc": nan_to_none(s.pacc),
            "mAcc": nan_to_none(s.macc),
            "images": self.images,
            "segments": self.segments,
            "unlabeled_pixels": s.unlabeled_pixels,
            "seconds": self.seconds,
            "stage_seconds": self.stage_seconds,
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
    embedder: Embedder,
    *,
    templates: Sequence[str] | None = None,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    save_dir: Path | None = None,
    max_image_pixels: int = 50_000_000,
    on_image: Progress | None = None,
) -> SemsegResult:
    """Run §4.3 voting on every image and score it against its label map."""
    started = time.perf_counter()
    timer = Timer()
    class_vectors = embedder.embed_texts(dataset.classes, templates)
    timer.add("text", started)
    cm = ConfusionMatrix(len(dataset.classes), dataset.ignore_index)
    n_segments = 0
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
        pred, n = predict_labels(pixels, segmenter, embedder, class_vectors, logit_scale, timer)
        n_segments += n
        t = time.perf_counter()
        cm.update(pred, gt)
        timer.add("score", t)
        if save_dir is not None:
            (save_dir / f"{img_path.stem}.png").write_bytes(label_png(pred))
        if on_image:
            on_image(i + 1, len(dataset.pairs), img_path.name)
    return SemsegResult(
        dataset.classes, cm.scores(), len(dataset.pairs), n_segments, time.perf_counter() - started, timer.seconds
    )
