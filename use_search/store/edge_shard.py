"""An open qdrant-edge shard whose engine errors become ``StoreDamagedError``, and the small
conversions every engine call needs (vectors, filters, paged scrolls)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import qdrant_edge as qe

from use_search.store.base import SearchFilter, StoreDamagedError, StoreError

SCROLL_PAGE = 256


def damaged_message(root: Path, detail: str) -> str:
    return (
        f"the store at {root} is damaged ({detail}): run `use-search store check` to see what, then "
        "`use-search store check --repair` to re-index it, or `use-search store restore SNAPSHOT`"
    )


class Shard:
    """An open ``EdgeShard`` whose engine errors (qdrant-edge raises bare ``Exception``: a payload that
    no longer decompresses, a damaged index file) become ``StoreDamagedError``."""

    def __init__(self, shard: qe.EdgeShard, path: Path) -> None:
        self._shard = shard
        self.path = path

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._shard, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                detail = f"{self.path.name}: {first}"
                raise StoreDamagedError(damaged_message(self.path.parent, detail), detail) from None

        return call


def load_shard(path: Path, config: qe.EdgeConfig) -> "Shard":
    # Passing the config applies our optimizer settings to stores created before them.
    try:
        return Shard(qe.EdgeShard.load(str(path), config), path)
    except Exception as e:  # qdrant-edge raises bare Exception
        raise StoreError(f"cannot open the embedded store shard at {path}: {e}") from None


def create_shard(path: Path, config: qe.EdgeConfig) -> "Shard":
    try:
        return Shard(qe.EdgeShard.create(str(path), config), path)
    except Exception as e:
        raise StoreError(f"cannot create the embedded store shard at {path}: {e}") from None


def as_vector(vector: np.ndarray) -> list[float]:
    return np.asarray(vector, dtype=np.float32).ravel().tolist()


def edge_filter(flt: SearchFilter | None, path_field: str = "paths") -> qe.Filter | None:
    if flt is None or flt.is_empty():
        return None
    return qe.Filter(must=[qe.FieldCondition(key=k, match=qe.MatchValue(v)) for k, v in flt.conditions(path_field)])


def scroll(
    shard: Shard | None, flt: SearchFilter | None, with_payload: Any = True, path_field: str = "paths"
) -> Iterator[Any]:
    if shard is None:
        return
    offset = None
    while True:
        records, offset = shard.scroll(
            qe.ScrollRequest(offset=offset, limit=SCROLL_PAGE, filter=edge_filter(flt, path_field), with_payload=with_payload)
        )
        yield from records
        if offset is None:
            return
