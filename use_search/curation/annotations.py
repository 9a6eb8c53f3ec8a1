"""Human box-text pairs that skip captioning and grounding (paper §3.1, §4.1: Visual Genome).

Visual Genome's ``region_descriptions.json`` is a list with one entry per image:
``{"id": 1, "regions": [{"region_id": 1382, "image_id": 1, "phrase": "the clock is green in colour",
"x": 421, "y": 57, "width": 82, "height": 139}, ...]}``; image ``1`` is the file ``1.jpg``
(``VG_100K/1.jpg``). Boxes are XYWH in pixels of the VG image.

About half of VG's images are COCO images. VG's ``image_data.json`` (``{"image_id": 1, "coco_id": null,
"width": 800, "height": 600, ...}`` per image) maps them: with it, the images being curated are COCO
images, found by the COCO id their file name ends in (``000000000009.jpg``,
``COCO_train2014_000000000009.jpg``), and the regions of the matching VG image are scaled from VG's
resolution (up to 800 px) to the COCO image's (up to 640 px). A COCO image framed differently from its
VG image is a ``RegionError``, never shifted boxes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from use_search.curation.pairs import BoxText, TextEntry

_TRAILING_DIGITS = re.compile(r"(\d+)$")


class RegionError(ValueError):
    """The image's VG regions cannot be used on it: another framing, or a malformed region."""


def read_entries(path: Path, what: str) -> list[dict]:
    """A JSON list of objects, or a ValueError that names the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a {what} file: {e}") from e
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"{path}: not a {what} file: expected a JSON list with one object per image")
    return data


class VisualGenomeRegions:
    """``pairs(path, width, height)``: the region descriptions of the image, in its pixels.

    Without ``image_data`` an image's file stem is its VG id; with it, the COCO id its stem ends in.
    """

    source = "annotation:vg"

    def __init__(self, region_file: Path, image_data: Path | None = None) -> None:
        data = read_entries(region_file, "Visual Genome region_descriptions.json")
        self.by_id: dict[str, list[dict]] = {}
        for entry in data:
            image_id = entry.get("id", entry.get("image_id"))
            self.by_id.setdefault(str(image_id), []).extend(entry.get("regions", []))
        self.key = "vg"
        self.vg_ids_of_coco: dict[int, list[str]] = {}
        self.vg_size: dict[str, tuple[int, int]] = {}
        if image_data is not None:
            self.key = "coco"
            for img in read_entries(image_data, "Visual Genome image_data.json"):
                vg_id = str(img.get("image_id", img.get("id")))
                if img.get("width") and img.get("height"):
                    self.vg_size[vg_id] = (int(img["width"]), int(img["height"]))
                if img.get("coco_id") is not None:
                    self.vg_ids_of_coco.setdefault(int(img["coco_id"]), []).append(vg_id)

    def vg_ids(self, path: Path | str) -> list[str]:
        stem = Path(path).stem
        if self.key == "vg":
            return [stem]
        m = _TRAILING_DIGITS.search(stem)
        return self.vg_ids_of_coco.get(int(m.group(1)), []) if m else []

    def pairs(self, path: Path | str, width: int, height: int) -> list[BoxText]:
        out = []
        for vg_id in self.vg_ids(path):
            sx, sy = self._scale(vg_id, path, width, height)
            for r in self.by_id.get(vg_id, []):
                try:
                    phrase = str(r.get("phrase", "")).strip()
                    x, y, w, h = (float(r[k]) for k in ("x", "y", "width", "height"))
                except (AttributeError, KeyError, TypeError, ValueError) as e:
                    raise RegionError(f"{path}: a region of VG image {vg_id} is malformed ({e!r}): {r!r:.200}") from e
                if not phrase or w <= 0 or h <= 0:
                    continue
                box = (x * sx, y * sy, (x + w) * sx, (y + h) * sy)
                out.append(BoxText(box, (TextEntry(phrase, "expression", self.source),)))
        return out

    def _scale(self, vg_id: str, path: Path | str, width: int, height: int) -> tuple[float, float]:
        """VG pixels → this image's pixels: 1 for VG's own files, else the resize between the two."""
        if self.key == "vg" or vg_id not in self.vg_size:
            return 1.0, 1.0
        vw, vh = self.vg_size[vg_id]
        sx, sy = width / vw, height / vh
        if abs(vh * sx - height) > max(2.0, 0.01 * height):  # more than the rounding of one resize
            raise RegionError(
                f"{path}: VG image {vg_id} is {vw}×{vh}, this image is {width}×{height}; not the same framing, "
                "so its regions would not fit (is image_data.json's coco_id map the right one for these images?)"
            )
        return sx, sy
