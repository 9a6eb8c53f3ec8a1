"""Segment-text pair curation (paper §3.1): captions → phrases → grounding → SAM boxes → mask NMS → shards.

Library entry points for the CLI: ``run_curation(CurationConfig) -> CurationSummary`` and
``shard_stats(folder) -> CurationStats``. Heavy modules (transformers, spaCy) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from use_search.curation.pipeline import CurationConfig, CurationSummary, run_curation
    from use_search.curation.stats import CurationStats, shard_stats

_EXPORTS = {
    "CurationConfig": "use_search.curation.pipeline",
    "CurationSummary": "use_search.curation.pipeline",
    "run_curation": "use_search.curation.pipeline",
    "CurationStats": "use_search.curation.stats",
    "shard_stats": "use_search.curation.stats",
}

__all__ = ["CurationConfig", "CurationStats", "CurationSummary", "run_curation", "shard_stats"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
