"""The query forms of ``EdgeStore`` (``VectorStore.query``, ``query_batch``, ``query_groups``) on
qdrant-edge: nearest or recommend (``RecommendSumScores``) with the engine's filters.

qdrant-edge has no group-by query, so ``groups`` does what the server's ``query_points_groups`` does
(top contents by their best segment, then each content's best segments) in two steps: nearest
segments reading only ``sha256`` until ``k`` distinct contents are seen (the fetch grows ×4 while
fewer are; it stops when the collection has no more), then one batched query per content (limit
``per_group``, filtered to that content). Cost: 1 + (number of ×4 growths) + 1 engine calls; points
touched: the fetched segments (sha256 only) plus ``k × per_group`` with payload. When fewer than ``k``
contents match (the filter, ``min_score``), the last fetch reads every matching point: a filtered
engine query, bounded by the points the filter lets through.
"""

from __future__ import annotations

from typing import Any, Sequence

import qdrant_edge as qe

from use_search.store.base import Scored, VectorQuery, hit_from
from use_search.store.edge_shard import as_vector
from use_search.types import Hit

SHA_ONLY = ["sha256"]


def engine_query(q: VectorQuery) -> Any:
    if q.nearest:
        return qe.Query.Nearest(as_vector(q.positives[0]))
    return qe.Query.RecommendSumScores(
        qe.RecommendQuery(positives=[as_vector(v) for v in q.positives], negatives=[as_vector(v) for v in q.negatives])
    )


def engine_filter(q: VectorQuery, only: Sequence[str] = ()) -> qe.Filter | None:
    must: list[Any] = [qe.FieldCondition(key=k, match=qe.MatchValue(v)) for k, v in (q.flt.conditions() if q.flt else [])]
    shas = list(only or q.only_shas)
    if shas:
        must.append(qe.FieldCondition(key="sha256", match=qe.MatchAny(shas)))
    must_not: list[Any] = []
    if q.exclude_ids:
        must_not.append(qe.HasIdCondition(set(q.exclude_ids)))
    if q.exclude_shas:
        must_not.append(qe.FieldCondition(key="sha256", match=qe.MatchAny(list(q.exclude_shas))))
    return qe.Filter(must=must, must_not=must_not) if must or must_not else None


def request(
    q: VectorQuery, k: int, min_score: float | None, payload: Any = True, only: Sequence[str] = (), params: Any = None
) -> qe.QueryRequest:
    """``params``: the store's search parameters (quantization rescoring, store/layout.py)."""
    return qe.QueryRequest(
        limit=k, query=engine_query(q), filter=engine_filter(q, only),
        score_threshold=q.threshold(min_score), with_payload=payload, params=params,
    )


def query(shard: Any, q: VectorQuery, k: int, min_score: float | None, params: Any = None) -> list[Hit]:
    return [hit_from(p.id, q.scaled(p.score), p.payload, q.flt) for p in shard.query(request(q, k, min_score, params=params))]


def query_batch(shard: Any, qs: Sequence[VectorQuery], k: int, min_score: float | None, params: Any = None) -> list[list[Scored]]:
    if not qs:
        return []
    results = shard.query_batch(qe.QueryBatchRequest([request(q, k, min_score, SHA_ONLY, params=params) for q in qs]))
    return [[Scored(str(p.id), q.scaled(p.score), p.payload["sha256"]) for p in points] for q, points in zip(qs, results)]


def groups(shard: Any, q: VectorQuery, k: int, per_group: int, min_score: float | None, params: Any = None) -> list[list[Hit]]:
    fetch = k * per_group
    while True:
        points = shard.query(request(q, fetch, min_score, SHA_ONLY, params=params))
        order = list(dict.fromkeys(p.payload["sha256"] for p in points))
        if len(order) >= k or len(points) < fetch:
            break
        fetch *= 4
    order = order[:k]
    if not order:
        return []
    batch = qe.QueryBatchRequest([request(q, per_group, min_score, True, only=[sha], params=params) for sha in order])
    return [[hit_from(p.id, q.scaled(p.score), p.payload, q.flt) for p in found] for found in shard.query_batch(batch)]
