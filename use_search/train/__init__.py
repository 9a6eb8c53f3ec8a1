"""Training the USE head (paper §3.2, §4.2), kept apart from inference (``use_search.model``).

``run(TrainConfig(...))`` is the library entry point behind ``use-search train``. Names are imported
on first use, so ``use_search.train.loss`` and ``.data`` load without the model stack (open_clip, timm).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataSpec": "data", "PairImage": "data", "PairSegment": "data", "coco_pairs": "data", "folder_pairs": "data",
    "load_pairs": "data", "shard_pairs": "data",
    "TrainConfig": "loop", "TrainResult": "loop", "run": "loop",
    "contrastive_loss": "loss",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'use_search.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"use_search.train.{_EXPORTS[name]}"), name)
