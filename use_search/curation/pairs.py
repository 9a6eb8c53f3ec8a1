"""Box-text pairs, segment-text pairs, and the mask NMS that merges duplicates (paper §3.1, §4.1).

"We use NMS to remove duplicate masks for each image because different text descriptions may refer to
the same object in the image. After NMS, all the text descriptions associated with the duplicate masks
will be merged and assigned to the corresponding mask." The paper does not say which duplicate is
kept. We rank SAM's masks by predicted IoU × stability score, SAM's two quality measures (§4.1 filters
on both). The whole-image masks of vague texts (boxes over 90% of the image, §3.1) are no prediction:
their scores of 1.0 are synthetic, so they rank below every SAM mask. A large object (IoU > 0.7 with the
whole image) then keeps its own mask and texts and receives the vague texts, instead of being
swallowed by the whole-image mask. The kept mask's texts come first, then those of the masks it
suppressed, best first; a text already present (ignoring case) is not repeated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from use_search.masks import mask_nms
from use_search.types import Segment


@dataclass(frozen=True)
class TextEntry:
    text: str
    kind: str  # "phrase", "expression", "category", "caption"
    source: str  # "caption:txt", "caption:coco", "caption:mllm", "annotation:vg", ...

    def to_json(self) -> dict[str, str]:
        return {"text": self.text, "kind": self.kind, "source": self.source}


@dataclass(frozen=True)
class BoxText:
    """A box prompt and the texts it carries (a phrase and its expression, or an annotation)."""

    box: tuple[float, float, float, float]  # XYXY pixels
    texts: tuple[TextEntry, ...]
    score: float = 1.0  # grounding confidence; 1 for human annotations


@dataclass
class SegmentTexts:
    segment: Segment
    texts: list[TextEntry] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """One ``segments`` entry of a shard record (see ``shards.py``)."""
        return {
            "rle": self.segment.rle,
            "bbox": [int(v) for v in self.segment.bbox],
            "area": int(self.segment.area),
            "texts": [t.to_json() for t in self.texts],
        }


def nms_rank(segment: Segment) -> float:
    """Higher is kept first: predicted IoU × stability for SAM masks, lowest for whole-image masks."""
    if segment.source == "whole-image":
        return float("-inf")
    score = float(segment.predicted_iou) * float(segment.stability_score)
    return score if math.isfinite(score) else -math.inf


def merge_by_mask_nms(pairs: Sequence[SegmentTexts], iou_threshold: float = 0.7) -> list[SegmentTexts]:
    """Greedy mask NMS over one image's segment-text pairs; duplicates' texts go to the kept mask."""
    if not pairs:
        return []
    groups = mask_nms([p.segment.rle for p in pairs], [nms_rank(p.segment) for p in pairs], iou_threshold)
    merged = []
    for group in groups:
        seen: set[str] = set()
        texts = []
        for i in group:
            for t in pairs[i].texts:
                key = t.text.strip().casefold()
                if key not in seen:
                    seen.add(key)
                    texts.append(t)
        merged.append(SegmentTexts(pairs[group[0]].segment, texts))
    return merged
