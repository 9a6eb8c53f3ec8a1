"""Query: recall@k of the stores' search against exact search, and latency (text encoding + search,
p50 / p95 / p99), on clustered vectors, with and without a 1%-selective payload filter.

    python bench/bench_query.py --preset tiny --dim 768 --sizes 10000,100000            # CPU
    python bench/bench_query.py --preset paper --device cuda --sizes 10000,100000,300000

Vectors: a Gaussian mixture on the unit sphere. ``--centres`` random unit centres; every point belongs
to one centre (drawn uniformly) and is normalize(centre + σ_c · n / √d), n standard normal, with a
spread σ_c per centre drawn from [0.4, 0.9] (cosine to its centre 0.74–0.93); queries are drawn
the same way near random centres. So every query has a real neighbourhood (its cluster) inside which
the top k must be told apart, the case where an approximate index loses recall; uniform random
vectors have no neighbours at all and make recall meaningless.

Payloads are the indexer's (``segment_payload``: path, folders, hash, an RLE of a few hundred
characters, bbox, scores), 100 segments per image; image i lives in the folder ``/photos/fNN`` with
NN = i mod 100, so ``SearchFilter(under="/photos/fNN")`` matches 1% of the points, independent of
the clusters. Points go in through the stores' own ``upsert_segments``; each size grows the same
store, then the embedded store is re-``optimize()``d (HNSW build).

Exact search is a numpy brute force over all points (or over the filter's points); recall@k is the
overlap of the store's k ids with the exact k, averaged over queries. A query's time is the CLIP text
tower on a query text (``TextEncoder.encode``, 4 prompt templates, random weights of the real
architecture) plus the store search for the clustered query vector: the same work as
``use-search query``; the text and search parts are also reported apart.

The server backend runs against qdrant-client's in-process ``:memory:`` mode unless ``--qdrant-url``
names a real server: that mode is a numpy brute-force scan in Python, not Qdrant's engine
(docs/design.md), so its latencies are not server figures and its recall is 1 by construction.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import QUERY_TEXTS, machine, percentiles, print_table, random_clip, rss_mb, sync, write_json  # noqa: E402
from synthetic import FOLDERS, SEGMENTS_PER_IMAGE, Mixture, folder_of, make_points  # noqa: E402

from use_search.model.text import TextEncoder  # noqa: E402
from use_search.presets import get_preset  # noqa: E402
from use_search.store.base import SearchFilter  # noqa: E402
from use_search.types import point_id  # noqa: E402


def exact_top(vectors: np.ndarray, rows: np.ndarray | None, q: np.ndarray, k: int) -> set[int]:
    """Row numbers of the k best dot products (over ``rows`` only, when given)."""
    cand = vectors if rows is None else vectors[rows]
    scores = cand @ q
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    return set((top if rows is None else rows[top]).tolist())


class Backend:
    def __init__(self, name: str, store, optimize: bool, brute_force: bool) -> None:
        self.name, self.store, self.optimize_after_load, self.brute_force = name, store, optimize, brute_force
        self.size = 0


def open_backends(names: list[str], dim: int, tmp: Path, qdrant_url: str | None) -> list[Backend]:
    out = []
    for name in names:
        if name == "edge":
            from use_search.store.edge import EdgeStore

            out.append(Backend("edge (qdrant-edge, HNSW)", EdgeStore(tmp / "edge", "bench"), True, False))
        elif name == "server":
            from qdrant_client import QdrantClient

            from use_search.store.server import ServerStore

            if qdrant_url:
                out.append(Backend(f"server {qdrant_url}", ServerStore.connect(qdrant_url, "bench_query"), False, False))
            else:
                out.append(Backend("server (qdrant-client :memory:, brute force)", ServerStore(QdrantClient(":memory:"), "bench"), False, True))
        else:
            raise SystemExit(f"unknown backend {name}")
        out[-1].store.ensure(dim)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "base", "paper"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--backends", default="edge,server")
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200, help="timed queries per size and case (after --warmup)")
    ap.add_argument("--server-queries", type=int, default=20, help="timed queries on the :memory: server mode")
    ap.add_argument("--server-max", type=int, default=100_000, help="largest size for the :memory: server mode")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--qdrant-url", help="a real Qdrant server for the server backend")
    ap.add_argument("--dim", type=int, help="vector size (default: the preset's CLIP embedding size)")
    ap.add_argument("--time-budget", type=float, default=0, help="stop growing once this many seconds have passed (0 = none)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    preset = get_preset(args.preset)
    clip = random_clip(preset.clip, args.device)
    text = TextEncoder(clip, args.device)
    dim = args.dim or clip.dim
    sizes = sorted(int(s) for s in args.sizes.split(","))
    mix = Mixture(args.centres, dim)
    n_q = max(args.queries, args.server_queries) + args.warmup
    queries = mix.queries(n_q)
    vectors = np.zeros((0, dim), np.float32)  # every point so far, row = point number
    ids: dict[str, int] = {}
    rows, skipped = [], []

    def encode(qi: int) -> None:
        text.encode([QUERY_TEXTS[qi % len(QUERY_TEXTS)] + ("" if qi < len(QUERY_TEXTS) else f" {qi}")])
        sync(args.device)

    with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
        backends = open_backends(args.backends.split(","), dim, Path(tmp), args.qdrant_url)
        for size in sizes:
            if args.time_budget and time.perf_counter() - started > args.time_budget:
                skipped.append(f"{size} (time budget of {args.time_budget:.0f} s spent)")
                continue
            if len(vectors) < size:
                new = mix.points(len(vectors), size - len(vectors))
                for j in range(len(vectors), size):
                    img, seg = divmod(j, SEGMENTS_PER_IMAGE)
                    ids[point_id(f"{img:064x}", seg)] = j
                vectors = np.concatenate([vectors, new])
            folder_rows = {f: np.flatnonzero((np.arange(size) // SEGMENTS_PER_IMAGE) % FOLDERS == f) for f in range(FOLDERS)}
            used_folders = min(FOLDERS, -(-size // SEGMENTS_PER_IMAGE))  # under 10k points a folder holds more than 1%
            for b in backends:
                if b.brute_force and size > args.server_max:
                    skipped.append(f"{b.name} at {size} (over --server-max {args.server_max})")
                    continue
                rss0 = rss_mb()
                t0 = time.perf_counter()
                for start in range(b.size, size, 10_000):
                    stop = min(start + 10_000, size)
                    b.store.upsert_segments(make_points(start, vectors[start:stop]))
                load_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                if b.optimize_after_load:
                    b.store.optimize()
                opt_s = time.perf_counter() - t0
                b.size = size
                timed = args.server_queries if b.brute_force else args.queries
                for filtered in (False, True):
                    case = "1% filter" if used_folders == FOLDERS else f"1/{used_folders} filter"
                    case = case if filtered else "all points"
                    t_text, t_search, t_total, recalls = [], [], [], []
                    for qi in range(args.warmup + timed):
                        folder = qi % used_folders
                        flt = SearchFilter(under=f"/photos/f{folder:02d}") if filtered else None
                        t0 = time.perf_counter()
                        encode(qi)
                        t1 = time.perf_counter()
                        hits = b.store.search(queries[qi], args.k, flt)
                        t2 = time.perf_counter()
                        if qi < args.warmup:
                            continue
                        t_text.append(t1 - t0)
                        t_search.append(t2 - t1)
                        t_total.append(t2 - t0)
                        want = exact_top(vectors, folder_rows[folder] if flt else None, queries[qi], args.k)
                        got = {ids[h.id] for h in hits}
                        if flt and any(folder_of(i) != f"/photos/f{folder:02d}" for i in got):
                            raise SystemExit(f"{b.name}: the filter let through a point of another folder")
                        recalls.append(len(got & want) / len(want))
                    tot, srch, txt = percentiles(t_total), percentiles(t_search), percentiles(t_text)
                    rows.append({
                        "backend": b.name, "points": size, "case": case, "dim": dim, "queries": timed,
                        "filter_fraction": 1.0 / used_folders if filtered else 1.0,
                        f"recall@{args.k}": float(np.mean(recalls)), "recall_min": float(np.min(recalls)),
                        "total_p50_ms": tot["p50_ms"], "total_p95_ms": tot["p95_ms"], "total_p99_ms": tot["p99_ms"],
                        "search_p50_ms": srch["p50_ms"], "search_p95_ms": srch["p95_ms"], "search_p99_ms": srch["p99_ms"],
                        "text_p50_ms": txt["p50_ms"], "load_s": load_s, "optimize_s": opt_s,
                        "rss_mb": rss_mb(), "rss_growth_mb": rss_mb() - rss0,
                    })
                    print_table(f"{b.name} at {size} points, {case}", [rows[-1]])
        for b in backends:
            b.store.close()

    print_table(
        f"query (text on {args.device} with {clip.arch} random weights + search, k={args.k}, "
        f"{args.centres}-centre Gaussian mixture, recall against numpy brute force)",
        [{k: r[k] for k in ("backend", "points", "case", "queries", f"recall@{args.k}", "recall_min", "total_p50_ms",
                            "total_p95_ms", "search_p50_ms", "search_p95_ms", "search_p99_ms", "text_p50_ms",
                            "load_s", "optimize_s", "rss_mb")}
         for r in rows],
    )
    for s in skipped:
        print(f"skipped: {s}")
    write_json(args.json, {
        "bench": "query", "preset": args.preset, "device": args.device, "text_tower": clip.arch, "dim": dim,
        "k": args.k, "centres": args.centres, "rows": rows, "skipped": skipped, "machine": machine(),
    })


if __name__ == "__main__":
    main()
