"""One vocabulary from segmenter to API: ``ImageRecord``, ``Segment``, ``SegmentPoint``, ``Hit``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

# Fixed namespace so a point id depends only on (content hash, segment index): a rerun overwrites.
POINT_NAMESPACE = uuid.UUID("6f0b5d3e-8f7a-4a43-9a52-6b1f4d0c2e11")


def point_id(sha256: str, segment_index: int) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"{sha256}:{segment_index}"))


@dataclass(frozen=True)
class ImageRecord:
    """An image as read from disk: the decoded RGB pixels are carried next to it, not in it."""

    path: str  # absolute, resolved
    sha256: str  # of the file bytes
    width: int
    height: int


@dataclass
class Segment:
    """A binary mask on an image plus what the segmenter said about it.

    ``bbox`` is COCO XYWH in pixels; ``rle`` is COCO compressed RLE with ``counts`` as str.
    """

    mask: np.ndarray  # bool, H x W
    bbox: tuple[int, int, int, int]
    area: int
    predicted_iou: float = 0.0
    stability_score: float = 0.0
    source: str = "auto"  # "auto" (point grid), "box", "whole-image", "annotation"
    rle: dict[str, Any] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.rle is None:
            from use_search.masks import encode_rle

            self.rle = encode_rle(self.mask)


class Segmenter(Protocol):
    """Anything that cuts an H×W×3 uint8 RGB image into segments (SAM automatic masks, annotations...).

    ``input_size``: the long side it works at (SAM's encoder resizes every image to it; the default
    working size, ``imaging.working_side``), None when any size is its own. ``image_batch``: how many
    images one ``segment_batch`` call takes to keep the device busy (the indexer's group size)."""

    input_size: int | None
    image_batch: int

    def segment(self, image: np.ndarray) -> list[Segment]: ...

    def segment_batch(self, images: Sequence[np.ndarray]) -> list[list[Segment]]: ...


@dataclass
class SegmentPoint:
    """What the store holds for one segment: its id, vector and payload."""

    id: str
    vector: np.ndarray
    payload: dict[str, Any]


@dataclass
class Hit:
    """A search result: one segment of one content, with its score. ``paths``: every indexed path with
    this content; ``path``: the one this result is shown under (one a path/folder filter asked for)."""

    id: str
    score: float
    path: str
    sha256: str
    segment_index: int
    bbox: tuple[int, int, int, int]
    area: int
    width: int
    height: int
    rle: dict[str, Any] | None  # None: searched without masks (``VectorStore.with_masks`` reads them)
    model: str
    payload: dict[str, Any]
    paths: list[str] = field(default_factory=list)

    @classmethod
    def from_payload(
        cls, id: str, score: float, payload: dict[str, Any], path: str | None = None, paths: list[str] | None = None
    ) -> "Hit":
        """``path``/``paths`` default to the payload's (``store.base.hit_from`` picks them for a filter)."""
        paths = paths if paths is not None else list(payload.get("paths") or [payload.get("path", "")])
        return cls(
            id=str(id),
            score=float(score),
            path=path if path is not None else (paths[0] if paths else ""),
            paths=paths,
            sha256=payload["sha256"],
            segment_index=int(payload["segment_index"]),
            bbox=tuple(payload["bbox"]),  # type: ignore[arg-type]
            area=int(payload["area"]),
            width=int(payload["width"]),
            height=int(payload["height"]),
            rle=payload.get("rle"),
            model=payload["model"],
            payload=payload,
        )

    def mask(self) -> np.ndarray:
        from use_search.masks import decode_rle

        if self.rle is None:
            raise ValueError(f"segment {self.id} was searched without its mask: read it with the store's with_masks")
        return decode_rle(self.rle)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "score": self.score,
            "path": self.path,
            "sha256": self.sha256,
            "segment_index": self.segment_index,
            "bbox": list(self.bbox),
            "area": self.area,
            "width": self.width,
            "height": self.height,
            **({"rle": self.rle} if self.rle is not None else {}),
            "model": self.model,
        }
