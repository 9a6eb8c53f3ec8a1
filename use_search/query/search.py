"""Text → segments: embed the prompt (template ensemble), search the store, check the model, dedup."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from use_search.store.base import SearchFilter, StoreError, VectorStore
from use_search.types import Hit


class QueryEmbedder(Protocol):
    """What a search needs of an embedder: an ``Embedder``, or its text side alone (``TextEmbedder``)."""

    model_id: str
    dim: int
    untrained: bool

    def embed_texts(self, texts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray: ...


class ModelMismatchError(StoreError):
    """The store was indexed with another model than the one embedding the query."""


def dedup_hits(hits: Sequence[Hit], k: int, iou_threshold: float = 0.8) -> list[Hit]:
    """Keep the best hit of each group of overlapping masks on the same image (SAM returns nested
    masks at several granularities; a result list of the same object three times is noise)."""
    from use_search.masks import iou_matrix  # pycocotools + scipy: only --dedup needs them

    kept: list[Hit] = []
    for hit in hits:
        same_image = [h for h in kept if h.sha256 == hit.sha256]
        if same_image and iou_matrix([hit.rle], [h.rle for h in same_image]).max() >= iou_threshold:
            continue
        kept.append(hit)
        if len(kept) == k:
            break
    return kept


def mismatch_message(store_model: str, query_model: str, dims: tuple[int, int] | None = None) -> str:
    widths = f" ({dims[0]}-d vectors; this model gives {dims[1]}-d)" if dims else ""
    return (
        f"this collection was built with {store_model}{widths}, but queries are embedded with "
        f"'{query_model}': query with the preset / --model / --clip it was indexed with, pick another "
        "collection with --collection, or re-index the images into a new collection with this model"
    )


class Searcher:
    def __init__(self, store: VectorStore, embedder: QueryEmbedder) -> None:
        self.store = store
        self.embedder = embedder
        self._checked = False

    def check_store(self) -> None:
        """Fail before searching when the collection's vectors cannot come from this embedder (another
        width: the engine itself would only say "Vector dimension error"), naming the model that
        built it, from its image records."""
        if self._checked:
            return
        dim = self.store.dim
        if dim is not None and dim != self.embedder.dim:
            first = next(iter(self.store.iter_images()), None)
            built = f"'{first.model}'" if first else "another model"
            raise ModelMismatchError(mismatch_message(built, self.embedder.model_id, (dim, self.embedder.dim)))
        self._checked = dim is not None

    def embed(self, text: str, templates: Sequence[str] | None = None) -> np.ndarray:
        return self.embedder.embed_texts([text], templates)[0]

    def search_vector(
        self,
        vector: np.ndarray,
        k: int = 10,
        flt: SearchFilter | None = None,
        min_score: float | None = None,
        dedup: bool = False,
        masks: bool = True,
    ) -> list[Hit]:
        """``masks=False``: the hits come without their RLE (``Hit.rle`` None), the cheaper search;
        ``--dedup`` compares masks, so it reads them anyway."""
        if k < 1:
            raise ValueError("k must be at least 1")
        self.check_store()
        fetch = k * 4 if dedup else k
        hits = self.store.search(vector, fetch, flt, min_score, masks=masks or dedup)
        foreign = {h.model for h in hits if h.model != self.embedder.model_id}
        if foreign:
            raise ModelMismatchError(mismatch_message(", ".join(f"'{m}'" for m in sorted(foreign)), self.embedder.model_id))
        return dedup_hits(hits, k) if dedup else hits[:k]

    def search(
        self,
        text: str,
        k: int = 10,
        flt: SearchFilter | None = None,
        min_score: float | None = None,
        dedup: bool = False,
        templates: Sequence[str] | None = None,
        masks: bool = True,
    ) -> list[Hit]:
        self.check_store()
        return self.search_vector(self.embed(text, templates), k, flt, min_score, dedup, masks)
