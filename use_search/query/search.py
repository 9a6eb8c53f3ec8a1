"""Text → segments: embed the prompt (template ensemble), search the store, check the model, dedup."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from use_search.masks import iou_matrix
from use_search.model.base import Embedder
from use_search.store.base import SearchFilter, StoreError, VectorStore
from use_search.types import Hit


class ModelMismatchError(StoreError):
    """The store was indexed with another model than the one embedding the query."""


def dedup_hits(hits: Sequence[Hit], k: int, iou_threshold: float = 0.8) -> list[Hit]:
    """Keep the best hit of each group of overlapping masks on the same image (SAM returns nested
    masks at several granularities; a result list of the same object three times is noise)."""
    kept: list[Hit] = []
    for hit in hits:
        same_image = [h for h in kept if h.sha256 == hit.sha256]
        if same_image and iou_matrix([hit.rle], [h.rle for h in same_image]).max() >= iou_threshold:
            continue
        kept.append(hit)
        if len(kept) == k:
            break
    return kept


class Searcher:
    def __init__(self, store: VectorStore, embedder: Embedder) -> None:
        self.store = store
        self.embedder = embedder

    def embed(self, text: str, templates: Sequence[str] | None = None) -> np.ndarray:
        return self.embedder.embed_texts([text], templates)[0]

    def search_vector(
        self,
        vector: np.ndarray,
        k: int = 10,
        flt: SearchFilter | None = None,
        min_score: float | None = None,
        dedup: bool = False,
    ) -> list[Hit]:
        if k < 1:
            raise ValueError("k must be at least 1")
        fetch = k * 4 if dedup else k
        hits = self.store.search(vector, fetch, flt, min_score)
        foreign = {h.model for h in hits if h.model != self.embedder.model_id}
        if foreign:
            raise ModelMismatchError(
                f"the store holds segments embedded with {', '.join(sorted(foreign))}, but queries are "
                f"embedded with '{self.embedder.model_id}': pick the same preset/--model as for indexing"
            )
        return dedup_hits(hits, k) if dedup else hits[:k]

    def search(
        self,
        text: str,
        k: int = 10,
        flt: SearchFilter | None = None,
        min_score: float | None = None,
        dedup: bool = False,
        templates: Sequence[str] | None = None,
    ) -> list[Hit]:
        return self.search_vector(self.embed(text, templates), k, flt, min_score, dedup)
