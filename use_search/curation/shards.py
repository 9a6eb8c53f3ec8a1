"""Segment-text pair shards: what ``curate`` writes and ``train`` reads.

A shard is a JSON Lines file ``pairs-NNNNN.jsonl`` in the output folder; one line per image:

    {"image": "/abs/path.jpg", "sha256": "...", "width": W, "height": H,
     "segments": [{"rle": {"size": [H, W], "counts": "..."}, "bbox": [x, y, w, h], "area": A,
                   "texts": [{"text": "the rabbit", "kind": "phrase", "source": "caption:mllm"}, ...]},
                  ...]}

``kind`` is one of "phrase", "expression", "category", "caption"; ``source`` says where the text came
from. A segment carries every text merged into it by mask NMS (paper §3.1).

``curate`` also writes ``"pairs_before_nms": N`` in each record: the (mask, text) pairs that went into
that image's mask NMS, for the statistics of the paper's Table 1. Readers may ignore it.

Writers never append to an existing shard: each run starts a new one, so a run killed mid-line leaves
at most one torn last line, in its own shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
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


def shard_index(path: Path) -> int:
    """NNNNN of ``pairs-NNNNN.jsonl``; -1 for a name that matches the glob but is not numbered."""
    try:
        return int(Path(path).name[len("pairs-") : -len(".jsonl")])
    except ValueError:
        return -1


def done_images(folder: Path) -> set[str]:
    """The ``image`` paths already recorded in ``folder``'s shards (whole lines only)."""
    return {str(rec["image"]) for rec in iter_shard_records(folder) if "image" in rec}


def repair_torn_tail(path: Path) -> bool:
    """Cut a partial last line (no final newline) off a shard; True if something was cut."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
        return True


class ShardWriter:
    """Appends one JSON line per image to new shards ``pairs-NNNNN.jsonl`` in ``folder``.

    Numbering continues after the shards already there; a shard holds at most ``records_per_shard``
    lines. Each line is flushed as written, so a killed run loses at most the line being written.
    """

    def __init__(self, folder: Path, records_per_shard: int = 1000) -> None:
        if records_per_shard < 1:
            raise ValueError("records_per_shard must be at least 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.records_per_shard = records_per_shard
        existing = sorted(self.folder.glob(SHARD_GLOB))
        for shard in existing:
            repair_torn_tail(shard)
        self.next_index = max((shard_index(p) for p in existing), default=-1) + 1
        self.written: list[Path] = []
        self._file: Any = None
        self._lines = 0

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None or self._lines >= self.records_per_shard:
            self._open_next()
        self._file.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._file.flush()
        self._lines += 1

    def _open_next(self) -> None:
        self.close()
        path = self.folder / shard_name(self.next_index)
        self.next_index += 1
        self._file = open(path, "x", encoding="utf-8")
        self._lines = 0
        self.written.append(path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
