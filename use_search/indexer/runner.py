"""The indexer: read → segment → embed → write, one image at a time, committed in small batches.

Consistency rule (see ``store/base.py``): an image's record is written only after all of its segment
points, so an interrupted run never leaves an image that looks done but is not; the rerun redoes it
and its deterministic point ids overwrite whatever part was written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from use_search.indexer.read import ImageReadError, LoadedImage, find_images, read_image
from use_search.model.base import Embedder
from use_search.store.base import ImageEntry, StoreError, VectorStore, segment_payload
from use_search.types import Segment, SegmentPoint, Segmenter, point_id

Status = Literal["indexed", "skipped", "failed", "duplicate"]


@dataclass
class ImageEvent:
    path: str
    status: Status
    segments: int = 0
    reason: str = ""


@dataclass
class IndexReport:
    indexed: int = 0
    skipped: int = 0
    duplicates: int = 0
    segments: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    pruned_images: int = 0
    pruned_segments: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def segment_points(loaded: LoadedImage, segments: Sequence[Segment], vectors: np.ndarray, model: str) -> list[SegmentPoint]:
    """The write stage's input: one point per segment with its payload."""
    rec = loaded.record
    at = now_iso()
    return [
        SegmentPoint(
            id=point_id(rec.sha256, i),
            vector=vectors[i],
            payload=segment_payload(
                path=rec.path, sha256=rec.sha256, width=rec.width, height=rec.height,
                segment_index=i, n_segments=len(segments), rle=s.rle, bbox=s.bbox, area=s.area,
                predicted_iou=s.predicted_iou, stability_score=s.stability_score, source=s.source,
                model=model, indexed_at=at,
            ),
        )
        for i, s in enumerate(segments)
    ]


class Indexer:
    def __init__(
        self,
        store: VectorStore,
        segmenter: Segmenter,
        embedder: Embedder,
        *,
        max_image_pixels: int = 50_000_000,
        batch_images: int = 4,
        extensions: Sequence[str] = (".jpg", ".jpeg", ".png"),
    ) -> None:
        self.store = store
        self.segmenter = segmenter
        self.embedder = embedder
        self.max_image_pixels = max_image_pixels
        self.batch_images = max(1, batch_images)
        self.extensions = tuple(extensions)
        store.ensure(embedder.dim)

    def check_model(self) -> None:
        """Refuse to mix vector spaces in one collection."""
        for entry in self.store.iter_images():
            if entry.model != self.embedder.model_id:
                raise StoreError(
                    f"this collection holds segments embedded with '{entry.model}', but this run embeds "
                    f"with '{self.embedder.model_id}'. Use another collection (--collection), or --force "
                    "to re-embed every image with the new model."
                )
            return

    def process(self, loaded: LoadedImage) -> list[SegmentPoint]:
        """Segment and embed one decoded image."""
        segments = self.segmenter.segment(loaded.pixels)
        vectors = self.embedder.embed_segments(loaded.pixels, segments)
        return segment_points(loaded, segments, vectors, self.embedder.model_id)

    def _commit(self, batch: list[tuple[LoadedImage, list[SegmentPoint]]]) -> None:
        points = [p for _, pts in batch for p in pts]
        if points:
            self.store.upsert_segments(points)
        for loaded, pts in batch:
            r = loaded.record
            self.store.put_image(
                ImageEntry(r.path, r.sha256, r.width, r.height, len(pts), self.embedder.model_id, now_iso())
            )
        batch.clear()

    def index(
        self,
        root: Path,
        *,
        prune: bool = False,
        force: bool = False,
        on_image: Callable[[ImageEvent], None] | None = None,
        on_total: Callable[[int], None] | None = None,
    ) -> IndexReport:
        started = time.perf_counter()
        report = IndexReport()
        if not force:
            self.check_model()
        files = list(find_images(root, self.extensions))
        if on_total:
            on_total(len(files))

        def emit(event: ImageEvent) -> None:
            if on_image:
                on_image(event)

        batch: list[tuple[LoadedImage, list[SegmentPoint]]] = []
        pending: list[ImageEvent] = []
        this_run: dict[str, str] = {}  # sha256 → path indexed in this run (its batch may not be committed yet)
        try:
            for path in files:
                try:
                    loaded = read_image(path, self.max_image_pixels)
                except ImageReadError as e:
                    report.failed.append((str(path), str(e)))
                    emit(ImageEvent(str(path), "failed", reason=str(e)))
                    continue
                rec = loaded.record
                old = self.store.get_image(rec.path)
                if old is not None and old.sha256 == rec.sha256 and not force:
                    report.skipped += 1
                    emit(ImageEvent(rec.path, "skipped", old.n_segments))
                    continue
                twin = next(
                    (e.path for e in self.store.find_images(rec.sha256) if e.path != rec.path and Path(e.path).exists()),
                    this_run.get(rec.sha256),
                )
                if twin is not None:
                    # Point ids come from the content hash: a second copy would overwrite the first's points.
                    report.duplicates += 1
                    emit(ImageEvent(rec.path, "duplicate", reason=f"same content as {twin}"))
                    continue
                if old is not None:  # the file changed: its old segments go first
                    self.store.delete_image(rec.path)
                try:
                    points = self.process(loaded)
                except Exception as e:  # one bad image must not end a long run
                    reason = f"{type(e).__name__}: {e}"
                    report.failed.append((rec.path, reason))
                    emit(ImageEvent(rec.path, "failed", reason=reason))
                    continue
                batch.append((loaded, points))
                this_run[rec.sha256] = rec.path
                pending.append(ImageEvent(rec.path, "indexed", len(points)))
                report.indexed += 1
                report.segments += len(points)
                if len(batch) >= self.batch_images:
                    self._commit(batch)
                    for ev in pending:
                        emit(ev)
                    pending.clear()
            self._commit(batch)
            for ev in pending:
                emit(ev)
            if prune:
                report.pruned_images, report.pruned_segments = self.prune(root)
        finally:
            report.seconds = time.perf_counter() - started
        return report

    def prune(self, root: Path) -> tuple[int, int]:
        """Remove the images (and their segments) under ``root`` whose files are gone."""
        root_s = str(Path(root).absolute())
        gone = [
            e.path
            for e in self.store.iter_images()
            if (e.path == root_s or e.path.startswith(root_s.rstrip("/") + "/")) and not Path(e.path).exists()
        ]
        segments = sum(self.store.delete_image(p) for p in gone)
        return len(gone), segments
