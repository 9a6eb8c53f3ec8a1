"""Human box-text pairs that skip captioning and grounding (paper §3.1, §4.1: Visual Genome).

Visual Genome's ``region_descriptions.json`` is a list with one entry per image:
``{"id": 1, "regions": [{"region_id": 1382, "image_id": 1, "phrase": "the clock is green in colour",
"x": 421, "y": 57, "width": 82, "height": 139}, ...]}``; image ``1`` is the file ``1.jpg``
(``VG_100K/1.jpg``). Boxes are XYWH in pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

from use_search.curation.pairs import BoxText, TextEntry


class VisualGenomeRegions:
    """``pairs(path)``: the region descriptions of the VG image whose file stem is its image id."""

    source = "annotation:vg"

    def __init__(self, region_file: Path) -> None:
        data = json.loads(Path(region_file).read_text(encoding="utf-8"))
        self.by_id: dict[str, list[dict]] = {}
        for entry in data:
            image_id = entry.get("id", entry.get("image_id"))
            self.by_id.setdefault(str(image_id), []).extend(entry.get("regions", []))

    def pairs(self, path: Path) -> list[BoxText]:
        out = []
        for r in self.by_id.get(Path(path).stem, []):
            phrase = str(r.get("phrase", "")).strip()
            w, h = float(r["width"]), float(r["height"])
            if not phrase or w <= 0 or h <= 0:
                continue
            x, y = float(r["x"]), float(r["y"])
            out.append(BoxText((x, y, x + w, y + h), (TextEntry(phrase, "expression", self.source),)))
        return out
