"""Text → segment retrieval eval on COCO-format instance annotations: recall@k and mAP.

The images are indexed (SAM segments → embeddings → store) into a temporary embedded store, or into a
given store (incrementally: images already there are not redone). Then every category with at least
one non-crowd instance is a query: its name goes through the text tower (prompt templates) and the
store is searched, restricted to the images folder. A hit is *correct* when its mask has IoU ≥
``iou_threshold`` (0.5) with a ground-truth instance of the queried class on the hit's image.

Figures, averaged over the queries, in percent:

- ``recall@k``: the query has at least one correct hit in its top k (success rate; the usual text →
  item retrieval recall).
- ``instance_recall@k``: ground-truth instances found in the top k / instances of the class; each
  instance counts once.
- ``mAP``: average precision over the top ``depth`` hits, detection style: each ground-truth instance can
  be matched once (the first, highest ranked, hit to reach it; later hits on the same instance are
  false positives), normalised by the class's instance count, so instances never reached add 0.

Hits on images of the folder that are not in the annotations are incorrect. Crowd regions are not
ground truth.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from use_search.eval.common import IMAGE_EXTENSIONS, nan_to_none
from use_search.eval.metrics import average_precision, coco_from_dataset
from use_search.indexer.runner import ImageEvent, Indexer, IndexReport
from use_search.masks import iou_matrix
from use_search.model.base import Embedder
from use_search.query.search import Searcher
from use_search.store.base import SearchFilter, VectorStore
from use_search.types import Hit, Segmenter

DEFAULT_KS = (1, 5, 10)


@dataclass(frozen=True)
class RetrievalOptions:
    """How queries are scored: recall at ``ks``, hits read per query (``depth``), the IoU at which a hit
    matches an instance, the categories queried (None: all) and the prompt templates."""

    ks: Sequence[int] = DEFAULT_KS
    depth: int = 100
    iou_threshold: float = 0.5
    classes: Sequence[str] | None = None
    templates: Sequence[str] | None = None


@dataclass
class QueryResult:
    category_id: int
    text: str
    n_gt: int
    hits: int  # hits returned (≤ depth)
    correct: list[bool]  # per ranked hit: matches a not-yet-matched instance (detection-style)
    any_match: list[bool]  # per ranked hit: matches any instance of the class
    ap: float
    first_correct_rank: int | None


@dataclass
class RetrievalResult:
    ks: tuple[int, ...]
    depth: int
    queries: list[QueryResult]
    recall: dict[int, float]  # percent
    instance_recall: dict[int, float]  # percent
    map: float  # percent
    images: int
    segments: int
    index_report: IndexReport | None
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "mAP": nan_to_none(self.map),
            **{f"recall@{k}": nan_to_none(v) for k, v in self.recall.items()},
            **{f"instance_recall@{k}": nan_to_none(v) for k, v in self.instance_recall.items()},
            "depth": self.depth,
            "queries": len(self.queries),
            "images": self.images,
            "segments": self.segments,
            "seconds": self.seconds,
            "stage_seconds": self.stage_seconds,
            "per_query": [
                {
                    "category_id": q.category_id, "text": q.text, "instances": q.n_gt, "AP": nan_to_none(q.ap * 100.0),
                    "first_correct_rank": q.first_correct_rank,
                }
                for q in self.queries
            ],
        }


def judge_hits(hits: Sequence[Hit], gt_rles: dict[str, list[Any]], iou_threshold: float = 0.5) -> tuple[list[bool], list[bool]]:
    """For a ranked hit list and the class's ground-truth RLEs per image key: (correct, any_match).

    ``correct[i]``: hit i reaches IoU ≥ threshold with a ground-truth instance no earlier hit matched
    (it takes the best-IoU free one); ``any_match[i]``: with any instance of the class."""
    used: dict[str, set[int]] = {}
    correct, any_match = [], []
    for h in hits:
        gts = gt_rles.get(h.path, [])
        if not gts:
            correct.append(False)
            any_match.append(False)
            continue
        ious = iou_matrix([h.rle], gts)[0]
        ok = ious >= iou_threshold
        any_match.append(bool(ok.any()))
        taken = used.setdefault(h.path, set())
        free = [j for j in np.argsort(-ious, kind="stable") if ok[j] and j not in taken]
        if free:
            taken.add(int(free[0]))
            correct.append(True)
        else:
            correct.append(False)
    return correct, any_match


def score_queries(queries: Sequence[QueryResult], ks: Sequence[int]) -> tuple[dict[int, float], dict[int, float], float]:
    if not queries:
        nan = float("nan")
        return {k: nan for k in ks}, {k: nan for k in ks}, nan
    recall = {k: float(np.mean([any(q.any_match[:k]) for q in queries]) * 100.0) for k in ks}
    inst = {k: float(np.mean([sum(q.correct[:k]) / q.n_gt for q in queries]) * 100.0) for k in ks}
    m = float(np.mean([q.ap for q in queries]) * 100.0)
    return recall, inst, m


class RetrievalDataset:
    """COCO instances + the folder their ``file_name``s are relative to."""

    def __init__(self, images_dir: Path, annotations: Path | dict[str, Any]) -> None:
        data = annotations if isinstance(annotations, dict) else json.loads(Path(annotations).read_text())
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"annotations are not COCO format: no '{key}'")
        self.images_dir = Path(images_dir).absolute()
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"no such folder: {images_dir}")
        self.coco = coco_from_dataset(data)
        missing = [i["file_name"] for i in self.coco.imgs.values() if not (self.images_dir / i["file_name"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} annotated image(s) are not under {images_dir}: {', '.join(missing[:3])}"
            )

    def path_of(self, img_id: int) -> str:
        """The path the indexer stores for this image (absolute, as ``find_images`` yields it)."""
        return str(self.images_dir / self.coco.imgs[img_id]["file_name"])

    def gt_by_path(self, cat_id: int) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for ann in self.coco.loadAnns(self.coco.getAnnIds(catIds=[cat_id], iscrowd=False)):
            out.setdefault(self.path_of(ann["image_id"]), []).append(self.coco.annToRLE(ann))
        return out

    def queries(self, names: Sequence[str] | None = None) -> list[tuple[int, str]]:
        cats = [self.coco.cats[c] for c in sorted(self.coco.getCatIds())]
        if names is not None:
            wanted = {n.strip() for n in names}
            unknown = wanted - {c["name"] for c in cats}
            if unknown:
                raise ValueError(f"not a category of the annotations: {', '.join(sorted(unknown))}")
            cats = [c for c in cats if c["name"] in wanted]
        return [(int(c["id"]), str(c["name"])) for c in cats if self.coco.getAnnIds(catIds=[c["id"]], iscrowd=False)]


def evaluate_retrieval(
    dataset: RetrievalDataset,
    searcher: Searcher,
    options: RetrievalOptions = RetrievalOptions(),
) -> RetrievalResult:
    """Score the store ``searcher`` searches (already holding the dataset's images)."""
    ks = tuple(sorted(set(int(k) for k in options.ks)))
    if not ks or ks[0] < 1:
        raise ValueError("ks must be positive")
    depth, templates = max(options.depth, ks[-1]), options.templates
    started = time.perf_counter()
    t_text = t_search = 0.0
    flt = SearchFilter(under=str(dataset.images_dir))
    results = []
    for cat_id, name in dataset.queries(options.classes):
        t0 = time.perf_counter()
        vec = searcher.embed(name, templates)
        t1 = time.perf_counter()
        hits = searcher.search_vector(vec, depth, flt)
        t_search += time.perf_counter() - t1
        t_text += t1 - t0
        gt = dataset.gt_by_path(cat_id)
        n_gt = sum(len(v) for v in gt.values())
        correct, any_match = judge_hits(hits, gt, options.iou_threshold)
        first = next((i + 1 for i, c in enumerate(any_match) if c), None)
        results.append(QueryResult(cat_id, name, n_gt, len(hits), correct, any_match, average_precision(correct, n_gt), first))
    recall, inst, m = score_queries(results, ks)
    seconds = time.perf_counter() - started
    return RetrievalResult(
        ks, depth, results, recall, inst, m, images=len(dataset.coco.imgs),
        segments=searcher.store.count_segments(flt), index_report=None, seconds=seconds,
        stage_seconds={"text": t_text, "search": t_search, "judge": seconds - t_text - t_search},
    )


def index_and_evaluate(
    dataset: RetrievalDataset,
    segmenter: Segmenter,
    embedder: Embedder,
    store: VectorStore | None = None,
    *,
    options: RetrievalOptions = RetrievalOptions(),
    max_image_pixels: int = 50_000_000,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    on_image: Callable[[ImageEvent], None] | None = None,
    work_side: int | None = None,
) -> RetrievalResult:
    """Index ``dataset.images_dir`` into ``store`` (a temporary embedded store when None), then score.
    ``work_side``: as the indexer's (``imaging.working_side``); None: full resolution."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="use-search-eval-") as tmp:
        owned = store is None
        if owned:
            from use_search.store.edge import EdgeStore

            store = EdgeStore(Path(tmp), "eval")
        try:
            indexer = Indexer(
                store, segmenter, embedder, max_image_pixels=max_image_pixels, batch_images=8, extensions=extensions,
                work_side=work_side,
            )
            report = indexer.index(dataset.images_dir, on_image=on_image)
            if report.failed:
                bad = ", ".join(f"{p}: {r}" for p, r in report.failed[:3])
                raise ValueError(f"{len(report.failed)} image(s) could not be indexed: {bad}")
            t = time.perf_counter()
            store.optimize()
            index_s, optimize_s = t - started, time.perf_counter() - t
            result = evaluate_retrieval(dataset, Searcher(store, embedder), options)
        finally:
            if owned:
                store.close()
    result.index_report = report
    result.stage_seconds = {"index": index_s, "optimize": optimize_s, **result.stage_seconds}
    result.seconds = time.perf_counter() - started
    return result
