"""The ``VectorStore`` interface: one point per segment, one image record per indexed image.

Two collections live side by side:
- segments: one point per segment, id ``point_id(sha256, segment_index)``, the segment vector, and a
  payload (``segment_payload``) with path, sha256, size, COCO RLE, bbox, area, scores, model, time;
- images: one record per image, id ``image_id(path)``, a payload ``ImageEntry``. It is written only
  after all of the image's segments are upserted, so "has an image record with this sha256" means
  "completely indexed": an interrupted run leaves no record and a rerun redoes (overwrites) the image.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Sequence

import numpy as np

from use_search.types import Hit, SegmentPoint

IMAGE_NAMESPACE = uuid.UUID("0d6c8a51-2b7e-4f8e-9c3a-54a1b7e90c42")

# Payload fields with an index (keyword): exact path, content hash, and every ancestor folder of the
# path (``dirs``) so "everything under /photos/2024" is an indexed exact match, not a string scan.
INDEXED_FIELDS = ("path", "sha256", "dirs")


def image_id(path: str) -> str:
    return str(uuid.uuid5(IMAGE_NAMESPACE, path))


def ancestor_dirs(path: str) -> list[str]:
    return [str(p) for p in PurePosixPath(path).parents]


class StoreError(RuntimeError):
    """The store cannot be used (unreachable server, locked embedded store, wrong dimension...)."""


class StoreDamagedError(StoreError):
    """The engine failed on the store's files after they were opened (corrupt payload, vector or index
    files); the message names the commands that check, repair or restore the store, ``detail`` is the
    engine's own words."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class StoreFullError(StoreError):
    """The embedded store's disk has less free space than a write needs plus the safety margin."""


@dataclass(frozen=True)
class ImageEntry:
    path: str
    sha256: str
    width: int
    height: int
    n_segments: int
    model: str
    indexed_at: str  # ISO 8601, UTC
    filename: str | None = None  # an upload's original file name (the API stores uploads by hash)
    # The file as it was read (``os.stat``): a rerun skips a file whose size and mtime still match
    # without opening it. None: unknown (records written before these fields, or uploads).
    size: int | None = None
    mtime_ns: int | None = None

    def payload(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if v is not None or k not in OPTIONAL_IMAGE_FIELDS}
        return {**fields, "dirs": ancestor_dirs(self.path)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "ImageEntry":
        return cls(**{k: payload[k] for k in cls.__dataclass_fields__ if k in payload})

    def matches_stat(self, size: int, mtime_ns: int) -> bool:
        """Same size and modification time as recorded: the file is taken as unchanged."""
        return self.size is not None and self.size == size and self.mtime_ns == mtime_ns


OPTIONAL_IMAGE_FIELDS = ("filename", "size", "mtime_ns")  # left out of the payload when None


@dataclass(frozen=True)
class StoredPoint:
    id: str
    vector: np.ndarray  # float32, as the engine returns it (cosine collections store it normalised)
    payload: dict[str, Any]


@dataclass(frozen=True)
class SearchFilter:
    """Restrict a search to one image path and/or to the images under a folder."""

    path: str | None = None
    under: str | None = None  # a folder: matches every path below it (via the ``dirs`` payload)
    sha256: str | None = None

    def is_empty(self) -> bool:
        return self.path is None and self.under is None and self.sha256 is None

    def conditions(self) -> list[tuple[str, str]]:
        """(field, exact value) pairs, all of which must match."""
        out = []
        if self.path is not None:
            out.append(("path", self.path))
        if self.under is not None:
            out.append(("dirs", str(PurePosixPath(self.under))))
        if self.sha256 is not None:
            out.append(("sha256", self.sha256))
        return out


class VectorStore(ABC):
    """Segments + image records. Implementations: ``EdgeStore`` (embedded), ``ServerStore`` (Qdrant)."""

    @abstractmethod
    def ensure(self, dim: int) -> None:
        """Create the collections for ``dim``-d cosine vectors if missing; ``StoreError`` if an existing
        segments collection has another dimension (the model changed: use another collection)."""

    @property
    @abstractmethod
    def dim(self) -> int | None:
        """Vector size of the segments collection, or None if it does not exist yet."""

    @abstractmethod
    def upsert_segments(self, points: Sequence[SegmentPoint]) -> None: ...

    @abstractmethod
    def put_image(self, entry: ImageEntry) -> None: ...

    def put_images(self, entries: Sequence[ImageEntry]) -> None:
        """Several records in one write (one commit's worth)."""
        for entry in entries:
            self.put_image(entry)

    @abstractmethod
    def get_image(self, path: str) -> ImageEntry | None: ...

    @abstractmethod
    def get_image_by_id(self, image_id: str) -> ImageEntry | None:
        """The image record whose id is ``image_id`` (``image_id(path)``): one lookup, no scan."""

    @abstractmethod
    def iter_images(self) -> Iterator[ImageEntry]: ...

    @abstractmethod
    def find_images(self, sha256: str) -> list[ImageEntry]:
        """Image records with this content hash (a file indexed under another path)."""

    @abstractmethod
    def delete_image(self, path: str) -> int:
        """Delete the image record and every segment with this path; return how many segments went."""

    @abstractmethod
    def search(
        self, vector: np.ndarray, k: int, flt: SearchFilter | None = None, min_score: float | None = None
    ) -> list[Hit]: ...

    @abstractmethod
    def get_segments(self, ids: Sequence[str]) -> list[Hit]:
        """Segments by id (score 0.0), in the order given; unknown ids are left out."""

    @abstractmethod
    def scroll_segments(self, flt: SearchFilter | None = None) -> Iterator[Hit]:
        """Every segment matching ``flt`` (score 0.0), in no particular order."""

    @abstractmethod
    def count_segments(self, flt: SearchFilter | None = None) -> int: ...

    @abstractmethod
    def segment_paths(self, flt: SearchFilter | None = None) -> Iterator[str]:
        """The distinct image paths of the segments matching ``flt`` (reads the path field only)."""

    @abstractmethod
    def count_images(self) -> int: ...

    # Integrity (``store check``): raw points, read without trusting their payload ---------------------
    @abstractmethod
    def point_ids(self) -> Iterator[str]:
        """Every segment point's id (reads neither payload nor vector, so damage there does not stop it)."""

    @abstractmethod
    def read_points(self, ids: Sequence[str]) -> list[StoredPoint]:
        """The points with these ids, vector and payload as stored (unknown ids left out);
        ``StoreDamagedError`` if the engine cannot read one of them."""

    @abstractmethod
    def delete_segments(self, ids: Sequence[str]) -> None:
        """Delete segment points by id (whatever their payload holds)."""

    def snapshot(self, out: Path) -> None:
        """Write a backup of both collections to the file ``out`` (``restore`` reads it back)."""
        raise StoreError(
            f"snapshots are not supported on this backend ({type(self).__name__}): use the Qdrant server's own "
            "snapshot API (POST /collections/NAME/snapshots) for both collections"
        )

    def optimize(self) -> None:
        """Index what is not indexed yet (HNSW for the embedded store). No-op where the engine does it."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "VectorStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def segment_payload(
    *,
    path: str,
    sha256: str,
    width: int,
    height: int,
    segment_index: int,
    n_segments: int,
    rle: dict[str, Any],
    bbox: tuple[int, int, int, int],
    area: int,
    predicted_iou: float,
    stability_score: float,
    source: str,
    model: str,
    indexed_at: str,
) -> dict[str, Any]:
    return {
        "path": path,
        "dirs": ancestor_dirs(path),
        "sha256": sha256,
        "width": width,
        "height": height,
        "segment_index": segment_index,
        "n_segments": n_segments,
        "rle": rle,
        "bbox": list(bbox),
        "area": area,
        "predicted_iou": predicted_iou,
        "stability_score": stability_score,
        "source": source,
        "model": model,
        "indexed_at": indexed_at,
    }
