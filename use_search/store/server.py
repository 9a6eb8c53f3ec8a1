"""``ServerStore``: the store on a Qdrant server through qdrant-client.

Two collections: ``collection`` (one point per segment, cosine vectors) and ``collection + "_images"``
(one record per image, no vector). Writes wait for the server to apply them (``wait=True``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from use_search.store.base import (
    IMAGE_INDEXED_FIELDS,
    LEGACY_PATH_FIELD,
    MASK_FIELDS,
    SEGMENT_INDEXED_FIELDS,
    ImageEntry,
    SearchFilter,
    StoredPoint,
    StoreError,
    Scored,
    VectorQuery,
    VectorStore,
    hit_from,
    image_id,
    references,
)
from use_search.store.layout import (
    Layout,
    SearchTuning,
    resolve,
    server_create_options,
    server_recorded,
    server_search_params,
)
from use_search.types import Hit, SegmentPoint

UPSERT_BATCH = 256
SCROLL_PAGE = 256


class ServerStore(VectorStore):
    def __init__(
        self,
        client: QdrantClient,
        collection: str,
        *,
        url: str | None = None,
        shard_number: int | None = None,
        replication_factor: int | None = None,
        write_consistency_factor: int | None = None,
        layout: Mapping[str, Any] | None = None,
        tuning: SearchTuning | None = None,
    ) -> None:
        """``layout``: the creation-time settings asked for (store/layout.py; unset ones: the collection's own)."""
        self.client = client
        self._wanted = dict(layout or {})
        self._tuning = tuning or SearchTuning()
        self._layout: Layout | None = None
        self.collection = collection
        self.images_collection = collection + "_images"
        self.url = url or "the Qdrant server"
        self._existing: set[str] = set()  # collections seen to exist (they are never dropped here)
        # Cluster options, used when a collection is created (None: the server's default). The image
        # records are few: one shard, replicated like the segments.
        replicas = {
            k: v
            for k, v in dict(replication_factor=replication_factor, write_consistency_factor=write_consistency_factor).items()
            if v is not None
        }
        self._create_options = {
            self.collection: {**replicas, **({"shard_number": shard_number} if shard_number else {})},
            self.images_collection: {**replicas, **({"shard_number": 1} if shard_number else {})},
        }

    @classmethod
    def connect(
        cls,
        url: str,
        collection: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        shard_number: int | None = None,
        replication_factor: int | None = None,
        write_consistency_factor: int | None = None,
        layout: Mapping[str, Any] | None = None,
        tuning: SearchTuning | None = None,
    ) -> "ServerStore":
        """Connect to the server at ``url``; ``StoreError`` at once if it does not answer."""
        # check_compatibility=False: its version probe only warns; our probe below raises instead.
        client = QdrantClient(
            url=url, api_key=api_key, timeout=max(1, math.ceil(timeout_s)), check_compatibility=False
        )
        store = cls(
            client, collection, url=url, shard_number=shard_number, replication_factor=replication_factor,
            write_consistency_factor=write_consistency_factor, layout=layout, tuning=tuning,
        )
        with store._errors():
            client.get_collections()
        return store

    # Collections ---------------------------------------------------------------------------------
    def ensure(self, dim: int) -> None:
        with self._errors():
            if self._has(self.collection):
                if self.dim != dim:
                    raise StoreError(
                        f"collection {self.collection!r} at {self.url} holds {self.dim}-d vectors, the "
                        f"model gives {dim}-d: use another collection (store.collection) for this model"
                    )
                self.layout  # noqa: B018  (raises when the settings asked for differ from the collection's)
            else:
                self._layout = resolve(None, self._wanted, f"collection {self.collection!r} at {self.url}")
                self._create(self.collection, **server_create_options(self._layout, dim))
            if not self._has(self.images_collection):
                self._create(self.images_collection, vectors_config={})
            for name, fields in ((self.collection, SEGMENT_INDEXED_FIELDS), (self.images_collection, IMAGE_INDEXED_FIELDS)):
                indexed = self.client.get_collection(name).payload_schema
                for field in fields:
                    if field not in indexed:
                        self.client.create_payload_index(
                            name, field, models.PayloadSchemaType.KEYWORD, wait=True
                        )

    @property
    def layout(self) -> Layout | None:
        """The segments collection's quantization and on-disk settings (None while it does not exist);
        ``StoreError`` when settings were asked for that the collection was not created with."""
        if self._layout is None:
            with self._errors():
                if not self._has(self.collection):
                    return None
                recorded = server_recorded(self.client.get_collection(self.collection))
            self._layout = resolve(recorded, self._wanted, f"collection {self.collection!r} at {self.url}")
        return self._layout

    @property
    def dim(self) -> int | None:
        with self._errors():
            if not self._has(self.collection):
                return None
            vectors = self.client.get_collection(self.collection).config.params.vectors
        if not isinstance(vectors, models.VectorParams):
            raise StoreError(f"collection {self.collection!r} at {self.url} has named vectors, not one")
        return vectors.size

    # Writes --------------------------------------------------------------------------------------
    def upsert_segments(self, points: Sequence[SegmentPoint]) -> None:
        with self._errors():
            self._require(self.collection)
            for start in range(0, len(points), UPSERT_BATCH):
                batch = [
                    models.PointStruct(id=p.id, vector=_vector(p.vector), payload=p.payload)
                    for p in points[start : start + UPSERT_BATCH]
                ]
                self.client.upsert(self.collection, points=batch, wait=True)

    def put_image(self, entry: ImageEntry) -> None:
        self.put_images([entry])

    def put_images(self, entries: Sequence[ImageEntry]) -> None:
        with self._errors():
            self._require(self.images_collection)
            if not entries:
                return
            points = [models.PointStruct(id=image_id(e.path), vector={}, payload=e.payload()) for e in entries]
            self.client.upsert(self.images_collection, points=points, wait=True)

    def delete_records(self, paths: Sequence[str]) -> None:
        with self._errors():
            if paths and self._has(self.images_collection):
                records = models.PointIdsList(points=[image_id(p) for p in paths])
                self.client.delete(self.images_collection, points_selector=records, wait=True)

    def set_content_paths(self, updates: Mapping[str, Sequence[str]]) -> dict[str, int]:
        counts = {}
        with self._errors():
            if not self._has(self.collection):
                return {}
            for sha, paths in updates.items():
                flt = _filter(SearchFilter(sha256=sha))
                counts[sha] = n = self.client.count(self.collection, count_filter=flt, exact=True).count
                if n:
                    selector = models.FilterSelector(filter=flt)
                    self.client.set_payload(self.collection, payload=references(paths), points=selector, wait=True)
        return counts

    def delete_contents(self, shas: Sequence[str]) -> int:
        with self._errors():
            if not shas or not self._has(self.collection):
                return 0
            flt = models.Filter(must=[models.FieldCondition(key="sha256", match=models.MatchAny(any=list(shas)))])
            n = self.client.count(self.collection, count_filter=flt, exact=True).count
            if n:
                self.client.delete(self.collection, points_selector=models.FilterSelector(filter=flt), wait=True)
            return n

    # Images --------------------------------------------------------------------------------------
    def get_image(self, path: str) -> ImageEntry | None:
        return self.get_image_by_id(image_id(path))

    def get_image_by_id(self, image_id: str) -> ImageEntry | None:
        with self._errors():
            if not self._has(self.images_collection):
                return None
            records = self.client.retrieve(self.images_collection, ids=[image_id], with_payload=True)
        return ImageEntry.from_payload(records[0].payload) if records else None

    def iter_images(self) -> Iterator[ImageEntry]:
        for record in self._scroll(self.images_collection, None):
            yield ImageEntry.from_payload(record.payload)

    def find_images(self, sha256: str) -> list[ImageEntry]:
        return [
            ImageEntry.from_payload(r.payload)
            for r in self._scroll(self.images_collection, SearchFilter(sha256=sha256))
        ]

    def count_images(self) -> int:
        with self._errors():
            if not self._has(self.images_collection):
                return 0
            return self.client.count(self.images_collection, exact=True).count

    # Segments ------------------------------------------------------------------------------------
    def search(
        self, vector: np.ndarray, k: int, flt: SearchFilter | None = None, min_score: float | None = None,
        masks: bool = True,
    ) -> list[Hit]:
        with self._errors():
            if k <= 0 or not self._has(self.collection):
                return []
            result = self.client.query_points(
                self.collection,
                query=_vector(vector),
                limit=k,
                query_filter=_filter(flt),
                score_threshold=min_score,
                with_payload=True if masks else models.PayloadSelectorExclude(exclude=list(MASK_FIELDS)),
                search_params=self._params(),
            )
        return [hit_from(p.id, p.score, p.payload, flt) for p in result.points]

    # Query forms: the engine's recommend (sum_scores), batch and group-by queries -------------------
    def query(self, q: VectorQuery, k: int, min_score: float | None = None) -> list[Hit]:
        with self._errors():
            if k <= 0 or not self._has(self.collection):
                return []
            result = self.client.query_points(self.collection, **_request(q, k, min_score, True), search_params=self._params())
        return [hit_from(p.id, q.scaled(p.score), p.payload, q.flt) for p in result.points]

    def query_batch(self, qs: Sequence[VectorQuery], k: int, min_score: float | None = None) -> list[list[Scored]]:
        with self._errors():
            if not qs or not self._has(self.collection):
                return [[] for _ in qs]
            params = self._params()
            requests = [models.QueryRequest(**_request(q, k, min_score, ["sha256"], batch=True), params=params) for q in qs]
            results = self.client.query_batch_points(self.collection, requests=requests)
        return [
            [Scored(str(p.id), q.scaled(p.score), p.payload["sha256"]) for p in r.points] for q, r in zip(qs, results)
        ]

    def query_groups(self, q: VectorQuery, k: int, per_group: int, min_score: float | None = None) -> list[list[Hit]]:
        with self._errors():
            if k <= 0 or not self._has(self.collection):
                return []
            result = self.client.query_points_groups(
                self.collection, group_by="sha256", group_size=per_group, **_request(q, k, min_score, True),
                search_params=self._params(),
            )
        return [[hit_from(p.id, q.scaled(p.score), p.payload, q.flt) for p in g.hits] for g in result.groups]

    def _params(self) -> Any:
        """Every search's quantization tuning (rescore, oversampling); None on a float collection."""
        return server_search_params(self.layout or Layout(quantization="none"), self._tuning)

    def get_segments(self, ids: Sequence[str]) -> list[Hit]:
        with self._errors():
            if not ids or not self._has(self.collection):
                return []
            records = self.client.retrieve(self.collection, ids=list(ids), with_payload=True)
        found = {str(r.id): r.payload for r in records}
        return [hit_from(i, 0.0, found[i]) for i in ids if i in found]

    def scroll_segments(self, flt: SearchFilter | None = None) -> Iterator[Hit]:
        for record in self._scroll(self.collection, flt):
            yield hit_from(record.id, 0.0, record.payload, flt)

    def count_segments(self, flt: SearchFilter | None = None) -> int:
        with self._errors():
            if not self._has(self.collection):
                return 0
            return self.client.count(self.collection, count_filter=_filter(flt), exact=True).count

    def segment_values(self, field: str, flt: SearchFilter | None = None) -> Iterator[str]:
        seen: set[str] = set()
        for record in self._scroll(self.collection, flt, with_payload=[field]):
            value = (record.payload or {}).get(field)
            for v in value if isinstance(value, list) else [] if value is None else [value]:
                if v not in seen:
                    seen.add(v)
                    yield v

    def _segment_indexes(self) -> set[str]:
        with self._errors():
            if not self._has(self.collection):
                return set()
            return set(self.client.get_collection(self.collection).payload_schema or {})

    def _drop_legacy_path(self) -> None:
        with self._errors():
            everything = models.FilterSelector(filter=models.Filter(must=[]))
            self.client.delete_payload(self.collection, keys=[LEGACY_PATH_FIELD], points=everything, wait=True)
            self.client.delete_payload_index(self.collection, LEGACY_PATH_FIELD, wait=True)

    # Integrity -----------------------------------------------------------------------------------
    def point_ids(self) -> Iterator[str]:
        for record in self._scroll(self.collection, None, with_payload=False):
            yield str(record.id)

    def read_points(self, ids: Sequence[str]) -> list[StoredPoint]:
        with self._errors():
            if not ids or not self._has(self.collection):
                return []
            records = self.client.retrieve(self.collection, list(ids), with_payload=True, with_vectors=True)
        return [StoredPoint(str(r.id), np.asarray(r.vector, dtype=np.float32), r.payload or {}) for r in records]

    def delete_segments(self, ids: Sequence[str]) -> None:
        with self._errors():
            if ids and self._has(self.collection):
                self.client.delete(self.collection, points_selector=models.PointIdsList(points=list(ids)), wait=True)

    def index_info(self) -> dict[str, int]:
        with self._errors():
            if not self._has(self.collection):
                return {"segments": 0, "points": 0, "indexed": 0}
            info = self.client.get_collection(self.collection)
        return {"segments": info.segments_count or 0, "points": info.points_count or 0,
                "indexed": info.indexed_vectors_count or 0}

    def close(self) -> None:
        self.client.close()

    # Helpers -------------------------------------------------------------------------------------
    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn transport and HTTP errors into ``StoreError`` naming the server."""
        try:
            yield
        except ResponseHandlingException as e:
            raise StoreError(f"cannot reach Qdrant at {self.url}: {e}") from None
        except UnexpectedResponse as e:
            detail = e.content.decode(errors="replace")[:500]
            status = f"{e.status_code} {e.reason_phrase}"
            raise StoreError(f"Qdrant at {self.url} answered {status}: {detail}") from None

    def _has(self, name: str) -> bool:
        if name not in self._existing and self.client.collection_exists(name):
            self._existing.add(name)
        return name in self._existing

    def _create(self, name: str, **options: Any) -> None:
        try:
            self.client.create_collection(name, **options, **self._create_options.get(name, {}))
        except (UnexpectedResponse, ValueError):
            if not self.client.collection_exists(name):  # else another process created it just now
                raise
        self._existing.add(name)

    def _require(self, name: str) -> None:
        if not self._has(name):
            raise StoreError(f"collection {name!r} does not exist at {self.url}: call ensure(dim) first")

    def _scroll(self, name: str, flt: SearchFilter | None, with_payload: Any = True) -> Iterator[Any]:
        offset = None
        while True:
            with self._errors():
                if not self._has(name):
                    return
                records, offset = self.client.scroll(
                    name, scroll_filter=_filter(flt), limit=SCROLL_PAGE, offset=offset, with_payload=with_payload
                )
            yield from records
            if offset is None:
                return


def _vector(vector: np.ndarray) -> list[float]:
    return np.asarray(vector, dtype=np.float32).ravel().tolist()


def _filter(flt: SearchFilter | None, path_field: str = "paths") -> models.Filter | None:
    if flt is None or flt.is_empty():
        return None
    return models.Filter(
        must=[models.FieldCondition(key=k, match=models.MatchValue(value=v)) for k, v in flt.conditions(path_field)]
    )


def _request(q: VectorQuery, k: int, min_score: float | None, payload: Any, batch: bool = False) -> dict[str, Any]:
    """Keyword arguments of one query: ``query_points`` names the filter ``query_filter``, a batch's
    ``QueryRequest`` names it ``filter``."""
    if q.nearest:
        query: Any = _vector(q.positives[0])
    else:
        query = models.RecommendQuery(recommend=models.RecommendInput(
            positive=[_vector(v) for v in q.positives], negative=[_vector(v) for v in q.negatives],
            strategy=models.RecommendStrategy.SUM_SCORES,
        ))
    must: list[Any] = [models.FieldCondition(key=k_, match=models.MatchValue(value=v)) for k_, v in (q.flt.conditions() if q.flt else [])]
    if q.only_shas:
        must.append(models.FieldCondition(key="sha256", match=models.MatchAny(any=list(q.only_shas))))
    must_not: list[Any] = []
    if q.exclude_ids:
        must_not.append(models.HasIdCondition(has_id=list(q.exclude_ids)))
    if q.exclude_shas:
        must_not.append(models.FieldCondition(key="sha256", match=models.MatchAny(any=list(q.exclude_shas))))
    flt = models.Filter(must=must, must_not=must_not) if must or must_not else None
    return {
        "query": query, "limit": k, "filter" if batch else "query_filter": flt,
        "score_threshold": q.threshold(min_score), "with_payload": payload,
    }
