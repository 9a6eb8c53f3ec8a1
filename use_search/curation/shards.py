"""Segment-text pair shards: what ``curate`` writes and ``train`` reads.

A shard is a JSON Lines file ``pairs-NNNNN.jsonl`` in the output folder; one line per image:

    {"image": "/abs/path.jpg", "sha256": "...", "width": W, "height": H,
     "segments": [{"rle": {"size": [H, W], "counts": "..."}, "bbox": [x, y, w, h], "area": A,
                   "texts": [{"text": "the rabbit", "kind": "phrase", "source": "caption:mllm"}, ...]},
                  ...]}

``kind`` is one of "phrase", "expression", "category", "caption"; ``source`` says where the text came
from. A segment carries every text merged into it by mask NMS (paper §3.1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

SHARD_GLOB = "pairs-*.jsonl"


def shard_name(index: int) -> str:
    return f"pairs-{index:05d}.jsonl"


def iter_shard_records(folder: Path) -> Iterator[dict[str, Any]]:
    """Every image record of every shard in ``folder``, in shard order. A torn last line (a run
    killed mid-write) is skipped: its image is redone by the next ``curate`` run."""
    for shard in sorted(Path(folder).glob(SHARD_GLOB)):
        with open(shard, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
