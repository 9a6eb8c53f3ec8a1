"""Query forms (``use_search.query.forms``): p50 / p95 of more like this, negatives, --all with 2 and 3
phrases and --group image, against the plain text query, in the same run on the same store.

    nice -n 10 python bench/bench_forms.py --preset tiny --dim 768 --size 100000 --threads 1

The store is bench_query.py's: the same clustered vectors and payloads (100 segments per image),
written through ``upsert_segments`` into an embedded store, then ``optimize()``d (HNSW). Every form
runs through the query layer as the CLI and the API run it (``forms.segments`` / ``images`` /
``all_of`` on a ``Searcher``), so its time includes the text tower (tiny CLIP, random weights, 4
prompt templates per phrase) and the engine calls. The text tower's vector of a phrase is replaced by
a query vector drawn near a cluster centre (the tiny tower's random vectors have no neighbours in
the store); the tower still runs, so its cost is counted.

- text: one phrase, k = 10 (what ``use-search query TEXT`` does);
- like: more like a stored segment (``read_points`` of its vector + one nearest query), k = 10;
- text + not: one phrase and one negative (recommend, sum_scores), k = 10;
- all 1 / 2 / 3: ``all_of`` with 1-3 phrases, ``--candidates`` per phrase (one batched query),
  k = 10 images;
- group: ``--group image``, k = 10 images × 3 segments.
The cases run interleaved (round i runs each once, in a rotated order). The ratio column is each
form's p50 over the text query's p50.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import SEGMENTS_PER_IMAGE, Mixture, make_points  # noqa: E402
from benchlib import QUERY_TEXTS, machine, percentiles, print_table, random_clip, write_json  # noqa: E402

from use_search.model.text import TextEncoder  # noqa: E402
from use_search.presets import get_preset  # noqa: E402
from use_search.query import forms  # noqa: E402
from use_search.query.search import Searcher  # noqa: E402
from use_search.store.edge import EdgeStore  # noqa: E402
from use_search.types import point_id  # noqa: E402


class BenchEmbedder:
    """Runs the text tower on each phrase (its cost), answers with a clustered query vector."""

    model_id = "bench"
    untrained = True

    def __init__(self, text: TextEncoder, queries: np.ndarray) -> None:
        self.text, self.queries, self.dim = text, queries, queries.shape[1]
        self.next = 0

    def embed_texts(self, texts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        self.text.encode(list(texts))
        out = [self.queries[(self.next + i) % len(self.queries)] for i in range(len(texts))]
        self.next += len(texts)
        return np.stack(out)


def interleaved(cases: dict[str, Callable[[int], Any]], n: int, warmup: int) -> dict[str, list[float]]:
    """Round i runs every case once, starting one case later each round, so all share the machine's load."""
    names = list(cases)
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + n):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t0 = time.perf_counter()
            cases[name](i)
            if i >= warmup:
                out[name].append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "base", "paper"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--dim", type=int)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=1000, help="--all: candidates per phrase (settings.query.all_candidates)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clip = random_clip(get_preset(args.preset).clip, args.device)
    dim = args.dim or clip.dim
    mix = Mixture(args.centres, dim)
    embedder = BenchEmbedder(TextEncoder(clip, args.device), mix.queries(4096))
    rng = np.random.default_rng(7)

    def phrase(i: int, j: int = 0) -> str:  # a new text each time: no tokenizer or tower cache helps
        return f"{QUERY_TEXTS[(i + 7 * j) % len(QUERY_TEXTS)]} {i}-{j}"

    def stored_id(i: int) -> str:
        n = int(rng.integers(0, args.size))
        return point_id(f"{n // SEGMENTS_PER_IMAGE:064x}", n % SEGMENTS_PER_IMAGE)

    with tempfile.TemporaryDirectory(prefix="bench-forms-") as tmp:
        store = EdgeStore(Path(tmp), "bench")
        store.ensure(dim)
        t0 = time.perf_counter()
        for start in range(0, args.size, 10_000):
            stop = min(start + 10_000, args.size)
            store.upsert_segments(make_points(start, mix.points(start, stop - start)))
        store.optimize()
        build_s = time.perf_counter() - t0
        s = Searcher(store, embedder)
        cases: dict[str, Callable[[int], Any]] = {
            "text": lambda i: forms.segments(s, forms.Ask(texts=[phrase(i)]), 10),
            "like": lambda i: forms.segments(s, forms.Ask(like=[stored_id(i)]), 10),
            "text + not": lambda i: forms.segments(s, forms.Ask(texts=[phrase(i)], negatives=[phrase(i, 1)]), 10),
            "all, 1 phrase": lambda i: forms.all_of(s, [phrase(i)], k=10, candidates=args.candidates),
            "all, 2 phrases": lambda i: forms.all_of(s, [phrase(i), phrase(i, 1)], k=10, candidates=args.candidates),
            "all, 3 phrases": lambda i: forms.all_of(s, [phrase(i), phrase(i, 1), phrase(i, 2)], k=10, candidates=args.candidates),
            "group image": lambda i: forms.images(s, forms.Ask(texts=[phrase(i)]), 10, 3),
        }
        times = {name: percentiles(t) for name, t in interleaved(cases, args.queries, args.warmup).items()}
        store.close()
    base = times["text"]["p50_ms"]
    rows = [{"form": name, "p50_ms": t["p50_ms"], "p95_ms": t["p95_ms"], "x text p50": t["p50_ms"] / base}
            for name, t in times.items()]
    print_table(f"query forms, embedded store, {args.size:,} points ({dim}-d, HNSW built in {build_s:.0f} s), "
                f"{args.queries} queries each, --all candidates {args.candidates}", rows)
    write_json(args.json, {"bench": "forms", "size": args.size, "dim": dim, "candidates": args.candidates,
                           "build_s": build_s, "rows": rows, "machine": machine()})


if __name__ == "__main__":
    main()
