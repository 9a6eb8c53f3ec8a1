"""Query layer: text search over segments and result rendering (voting is ``use_search.voting``)."""

from use_search.query.search import ModelMismatchError, Searcher, dedup_hits

__all__ = ["ModelMismatchError", "Searcher", "dedup_hits"]
