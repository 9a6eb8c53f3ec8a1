"""When the embedded store builds its HNSW index: a segment size cap the engine does not keep by itself.

qdrant-edge writes every new point into one appendable segment and only indexes it at ``optimize()``;
its ``max_segment_size`` limits what the optimizer *merges*, not how large that appendable segment
grows. A batch of 100k 768-d points written at once was one 411 MB segment whose HNSW build peaked at
4.3 GB of RAM (docs/benchmarks.md, "Stores at scale"). So the store builds the index itself each time
a cap's worth of vectors has been written: every segment, and every build's memory, stays near the
cap whatever the batch size.
"""

from __future__ import annotations

FLOAT_BYTES = 4


def points_per_segment(dim: int, max_segment_mb: int | None) -> int | None:
    """Points whose float vectors fill ``max_segment_mb`` (the unit of the engine's own cap); None:
    no cap (the engine's default policy)."""
    if not max_segment_mb:
        return None
    return max(1, max_segment_mb * 1024 * 1024 // (dim * FLOAT_BYTES))
