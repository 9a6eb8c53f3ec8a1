"""Label maps as PNG: pixel value = class index, 255 (65535 past 255 classes) = unlabeled."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from use_search.voting.vote import UNLABELED

UNLABELED_PNG = 255


def _palette() -> list[int]:
    """Distinct colours for indices 0..254 (golden-angle hues), black for 255 (unlabeled)."""
    import colorsys

    pal: list[int] = []
    for i in range(256):
        if i == UNLABELED_PNG:
            pal += [0, 0, 0]
            continue
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.25 * (i % 3 == 2))
        pal += [int(r * 255), int(g * 255), int(b * 255)]
    return pal


def label_png(labels: np.ndarray) -> bytes:
    """Label map → PNG whose pixel values are the class indices, 255 = unlabeled.

    Up to 255 classes: an 8-bit palette PNG (values readable as indices, colours viewable); more:
    a 16-bit greyscale PNG with 65535 = unlabeled.
    """
    lab = np.asarray(labels)
    buf = io.BytesIO()
    if lab.max(initial=-1) < UNLABELED_PNG:
        arr = np.where(lab < 0, UNLABELED_PNG, lab).astype(np.uint8)
        img = Image.fromarray(arr)  # "L"; putpalette makes it "P" with the same indices
        img.putpalette(_palette())
        img.save(buf, format="PNG")
    else:
        arr = np.where(lab < 0, 65535, lab).astype(np.uint16)
        Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def read_label_png(data: bytes) -> np.ndarray:
    """Inverse of ``label_png``: (H, W) int32 with ``UNLABELED`` restored."""
    img = Image.open(io.BytesIO(data))
    arr = np.asarray(img).astype(np.int32)
    unl = UNLABELED_PNG if img.mode == "P" else 65535
    arr[arr == unl] = UNLABELED
    return arr
