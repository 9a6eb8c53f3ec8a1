"""The ``Embedder`` interface: segments of an image → vectors; texts → vectors in the same space."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from use_search.types import Segment


class Embedder(ABC):
    """Implementations: ``CropClipEmbedder`` (training-free baseline) and ``UseEmbedder`` (paper §3.2).

    Both return float32 rows, L2-normalised, ``dim`` wide; ``model_id`` is what payloads record so a
    query can tell that the index was built with the same model.
    """

    model_id: str
    dim: int
    untrained: bool

    @abstractmethod
    def embed_segments(self, image: np.ndarray, segments: Sequence[Segment]) -> np.ndarray:
        """``image`` H×W×3 uint8 RGB; one row per segment, in order."""

    def embed_batch(self, images: Sequence[np.ndarray], segments: Sequence[Sequence[Segment]]) -> list[np.ndarray]:
        """Several images at once: one (n_i, dim) array per image, as ``embed_segments`` would give.

        The default loops; an embedder whose encoder batches well (USE: one forward for several
        images) overrides it. The indexer calls this, one segmenter batch at a time."""
        if len(images) != len(segments):
            raise ValueError(f"{len(images)} images but {len(segments)} segment lists")
        return [self.embed_segments(im, segs) for im, segs in zip(images, segments)]

    @abstractmethod
    def embed_texts(self, texts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """One row per text: the mean of its template embeddings, re-normalised."""
