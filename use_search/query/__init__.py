"""Query layer: text search over segments, result rendering, and semantic segmentation by voting."""

from use_search.query.search import ModelMismatchError, Searcher, dedup_hits

__all__ = ["ModelMismatchError", "Searcher", "dedup_hits"]
