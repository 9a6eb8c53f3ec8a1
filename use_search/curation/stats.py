"""``use-search curate stats``: the figures of the paper's Table 1 for a shard folder.

- pairs: (mask, text) pairs before mask NMS — every grounded box counted once per text it carries
  (its phrase, and its expression when that differs), plus annotation pairs;
- pairs after NMS: segments, each with its merged list of texts;
- unique expressions: distinct texts over all segments, ignoring case.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from use_search.curation.shards import SHARD_GLOB, iter_shard_records


@dataclass
class CurationStats:
    images: int = 0
    images_with_segments: int = 0
    pairs: int = 0  # before NMS
    pairs_after_nms: int = 0  # segments
    texts_after_nms: int = 0  # (segment, text) entries after NMS
    unique_expressions: int = 0  # distinct texts, any kind
    unique_by_kind: dict[str, int] = field(default_factory=dict)  # distinct texts per kind
    by_source: dict[str, int] = field(default_factory=dict)  # text entries per source after NMS


def shard_stats(folder: Path) -> CurationStats:
    """One pass over ``folder``'s shards. A record without ``pairs_before_nms`` counts its texts.
    A missing folder, or one without shards, is an error naming it (not a table of zeros)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    if not any(folder.glob(SHARD_GLOB)):
        raise ValueError(f"no pair shards ({SHARD_GLOB}) in {folder}: `use-search curate run IMAGES --out {folder}` writes them")
    s = CurationStats()
    unique: set[str] = set()
    unique_kind: dict[str, set[str]] = {}
    sources: Counter[str] = Counter()
    for rec in iter_shard_records(Path(folder)):
        segments = rec.get("segments", [])
        n_texts = sum(len(seg.get("texts", [])) for seg in segments)
        s.images += 1
        s.images_with_segments += bool(segments)
        s.pairs += int(rec.get("pairs_before_nms", n_texts))
        s.pairs_after_nms += len(segments)
        s.texts_after_nms += n_texts
        for seg in segments:
            for t in seg.get("texts", []):
                key = t["text"].strip().casefold()
                unique.add(key)
                unique_kind.setdefault(t.get("kind", ""), set()).add(key)
                sources[t.get("source", "")] += 1
    s.unique_expressions = len(unique)
    s.unique_by_kind = {k: len(v) for k, v in sorted(unique_kind.items())}
    s.by_source = dict(sorted(sources.items()))
    return s
