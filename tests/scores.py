"""Semantic segmentation figures written out from their definitions, to check the eval's against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def pixel_scores(pred_dir: Path, label_dir: Path, n_classes: int) -> tuple[float, float]:
    """(pAcc, mIoU) in percent from saved prediction PNGs and the label PNGs, written out from their
    definitions: pixels whose truth is a class (not 255) count; a prediction of 255 (unlabeled) is a
    miss; a class absent from both truth and prediction is left out of the mean IoU."""
    correct = total = 0
    inter, union = np.zeros(n_classes), np.zeros(n_classes)
    for lab_path in sorted(label_dir.rglob("*.png")):
        gt = np.asarray(Image.open(lab_path)).astype(int)
        pred = np.asarray(Image.open(pred_dir / lab_path.relative_to(label_dir))).astype(int)
        valid = gt != 255
        correct += int(((pred == gt) & valid).sum())
        total += int(valid.sum())
        for c in range(n_classes):
            inter[c] += ((pred == c) & (gt == c) & valid).sum()
            union[c] += (((pred == c) | (gt == c)) & valid).sum()
    return correct / total * 100, float(np.mean(inter[union > 0] / union[union > 0]) * 100)
