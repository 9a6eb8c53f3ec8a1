"""use-search: vector search over image segments with Universal Segment Embeddings (USE)."""

__version__ = "0.1.0"
