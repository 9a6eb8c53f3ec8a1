"""Metrics: semantic-segmentation confusion matrix (mIoU, pAcc, mAcc), COCO mask mAP, ranked retrieval.

Conventions (those of mmsegmentation and the papers in Table 2):

- Ground-truth pixels equal to ``ignore_index`` are left out; any other ground-truth value outside
  ``0..n_classes-1`` is an error naming the value (mmsegmentation would drop its pixels from the truth
  yet count predictions on them as false positives: a wrong class list or label file, not data).
- A predicted label outside ``0..n_classes-1`` (``UNLABELED`` = -1: no segment covers the pixel) is a
  miss for the ground-truth class and a false positive for no class.
- IoU of a class = TP / (TP + FP + FN); a class that appears in neither ground truth nor prediction has
  no IoU (NaN) and is left out of the mean; a class predicted but absent from the ground truth has IoU 0.
- pAcc = correct pixels / valid pixels; mAcc = mean over classes present in the ground truth of
  TP / ground-truth pixels.
- Every figure is reported in percent (a perfect prediction scores 100).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


# ---------------------------------------------------------------------------------------------------
# Semantic segmentation


def check_ground_truth(gt: np.ndarray, n_classes: int, ignore_index: int, source: str, shift: int = 0) -> None:
    """Every ground-truth value must be a class index (``0..n_classes-1``) or ``ignore_index``;
    otherwise a ValueError naming the values and ``source``. ``shift``: what was subtracted from the
    file's values (``reduce_zero_label``), so the message gives the file's own values too."""
    g = np.asarray(gt)
    bad = (g != ignore_index) & ((g < 0) | (g >= n_classes))
    if not bad.any():
        return
    values = [int(v) for v in np.unique(g[bad])]
    shown = ", ".join(f"{v + shift} ({v} after reduce_zero_label)" if shift else str(v) for v in values)
    raise ValueError(
        f"{source} holds {shown}: outside the {n_classes} classes (0..{n_classes - 1}) and not the ignore "
        f"index {ignore_index} (check the class list, --ignore-index and --reduce-zero-label)"
    )


class ConfusionMatrix:
    """Accumulates an (n_classes, n_classes + 1) pixel count matrix: rows = ground truth, columns =
    prediction, the last column = "no valid prediction" (unlabeled pixels)."""

    def __init__(self, n_classes: int, ignore_index: int = 255) -> None:
        if n_classes < 1:
            raise ValueError("n_classes must be at least 1")
        self.n = n_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((n_classes, n_classes + 1), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray, source: str | None = None) -> None:
        """Count one image; ``source`` (its label file) is named in errors."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
        check_ground_truth(gt, self.n, self.ignore_index, f"ground truth of {source}" if source else "ground truth")
        g = gt.ravel().astype(np.int64)
        p = pred.ravel().astype(np.int64)
        valid = g != self.ignore_index
        g, p = g[valid], p[valid]
        p = np.where((p >= 0) & (p < self.n), p, self.n)  # unlabeled / out of range → the last column
        cols = self.n + 1
        self.matrix += np.bincount(g * cols + p, minlength=self.n * cols).reshape(self.n, cols)

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.n != self.n:
            raise ValueError("confusion matrices of different class counts")
        self.matrix += other.matrix
        return self

    # Per-class counts -------------------------------------------------------------------------
    @property
    def true_positives(self) -> np.ndarray:
        return np.diag(self.matrix[:, : self.n]).copy()

    @property
    def gt_pixels(self) -> np.ndarray:
        return self.matrix.sum(axis=1)

    @property
    def pred_pixels(self) -> np.ndarray:
        return self.matrix[:, : self.n].sum(axis=0)

    def iou(self) -> np.ndarray:
        """Per-class IoU in [0, 1]; NaN where the class is in neither ground truth nor prediction."""
        tp = self.true_positives.astype(np.float64)
        union = self.gt_pixels + self.pred_pixels - self.true_positives
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def accuracy(self) -> np.ndarray:
        """Per-class pixel accuracy (recall) in [0, 1]; NaN where the class has no ground truth."""
        gt = self.gt_pixels
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gt > 0, self.true_positives / np.maximum(gt, 1), np.nan)

    def scores(self) -> "SemsegScores":
        iou, acc = self.iou(), self.accuracy()
        total = int(self.gt_pixels.sum())
        return SemsegScores(
            miou=_nanmean(iou) * 100.0,
            pacc=(self.true_positives.sum() / total * 100.0) if total else float("nan"),
            macc=_nanmean(acc) * 100.0,
            iou=iou * 100.0,
            acc=acc * 100.0,
            gt_pixels=self.gt_pixels.copy(),
            pred_pixels=self.pred_pixels.copy(),
            unlabeled_pixels=int(self.matrix[:, self.n].sum()),
        )


@dataclass
class SemsegScores:
    miou: float
    pacc: float
    macc: float
    iou: np.ndarray  # (C,) percent, NaN = class absent from ground truth and prediction
    acc: np.ndarray  # (C,) percent, NaN = class absent from ground truth
    gt_pixels: np.ndarray
    pred_pixels: np.ndarray
    unlabeled_pixels: int  # valid ground-truth pixels no segment covered


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def segmentation_scores(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], n_classes: int, ignore_index: int = 255
) -> SemsegScores:
    """mIoU / pAcc / mAcc over a set of (prediction, ground truth) label maps, pixels pooled over images."""
    cm = ConfusionMatrix(n_classes, ignore_index)
    for p, g in zip(preds, gts, strict=True):
        cm.update(p, g)
    return cm.scores()


# ---------------------------------------------------------------------------------------------------
# COCO mask mAP (pycocotools is the reference)


@dataclass
class MaskAP:
    map: float  # mAP@[.5:.95], percent; NaN when no category has ground truth
    ap50: float
    ap75: float
    per_class: dict[int, float]  # category id → AP@[.5:.95] percent (NaN: no ground truth)
    stats: list[float]  # COCOeval's 12 summary numbers (fractions, -1 = undefined), as it reports them
    n_detections: int


def coco_from_dataset(dataset: dict[str, Any]):  # -> pycocotools.coco.COCO
    """A ``COCO`` object from an in-memory COCO-format dict (no file, no printing). The dict is copied:
    COCOeval rewrites ground-truth polygons into RLEs in place."""
    import copy

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def mask_map(
    coco_gt,  # pycocotools COCO with segmentation ground truth
    detections: Sequence[dict[str, Any]],
    cat_ids: Sequence[int] | None = None,
    img_ids: Sequence[int] | None = None,
    max_dets: int = 100,
) -> MaskAP:
    """Mask mAP of ``detections`` (COCO result dicts: image_id, category_id, segmentation RLE, score)
    with ``COCOeval(iouType="segm")``; the summary figure is exactly COCOeval's ``stats[0]`` × 100.

    With no detections at all every category with ground truth scores 0 (COCOeval's ``loadRes`` does
    not accept an empty list; an empty result has precision 0 everywhere).
    """
    from pycocotools.cocoeval import COCOeval

    cats = list(cat_ids) if cat_ids is not None else sorted(coco_gt.getCatIds())
    imgs = list(img_ids) if img_ids is not None else sorted(coco_gt.getImgIds())
    with_gt = {
        c: bool(coco_gt.getAnnIds(imgIds=imgs, catIds=[c], iscrowd=False)) for c in cats
    }
    dets = [d for d in detections if d["category_id"] in set(cats) and d["image_id"] in set(imgs)]
    if not dets:
        per = {c: (0.0 if with_gt[c] else float("nan")) for c in cats}
        m = 0.0 if any(with_gt.values()) else float("nan")
        stats = [0.0 if any(with_gt.values()) else -1.0] * 12
        return MaskAP(m, m, m, per, stats, 0)
    dets = [{**d, "segmentation": _bytes_rle(d["segmentation"])} for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.catIds = cats
        ev.params.imgIds = imgs
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # (T iou thresholds, R recall points, K cats, A areas, M maxDets)
    per: dict[int, float] = {}
    for k, c in enumerate(cats):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per[c] = float(p.mean() * 100.0) if p.size else float("nan")
    stats = [float(s) for s in ev.stats]

    def pct(s: float) -> float:
        return s * 100.0 if s > -1 else float("nan")

    return MaskAP(pct(stats[0]), pct(stats[1]), pct(stats[2]), per, stats, len(dets))


def _bytes_rle(rle: Any) -> Any:
    """Our RLEs carry ``counts`` as str (JSON-safe); pycocotools wants bytes."""
    if isinstance(rle, dict) and isinstance(rle.get("counts"), str):
        return {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}
    return rle


# ---------------------------------------------------------------------------------------------------
# Ranked retrieval


def average_precision(relevant: Sequence[bool], n_relevant: int) -> float:
    """AP of one ranked list: mean over the ``n_relevant`` ground-truth items of the precision at the
    rank where each is found (0 for those never found), i.e. Σ_{i: relevant} P@i / n_relevant."""
    if n_relevant <= 0:
        return float("nan")
    rel = np.asarray(relevant, dtype=bool)
    if not rel.any():
        return 0.0
    hits = np.cumsum(rel)
    ranks = np.arange(1, len(rel) + 1)
    return float((hits[rel] / ranks[rel]).sum() / n_relevant)
