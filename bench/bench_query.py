"""Query latency: text encoding + search, p50 / p95 / p99, at growing store sizes, on the embedded
store (qdrant-edge, HNSW after ``optimize()``) and the server backend (qdrant-client).

    python bench/bench_query.py --preset paper --device cuda --sizes 10000,100000,300000
    python bench/bench_query.py --preset tiny --device cpu --sizes 10000,100000 --server-max 100000

Points are random unit vectors of the embedder's dimension (768 for ``paper``'s ViT-L/14-336) with
a payload shaped like the indexer's (path, folders, hash, RLE, bbox, scores...), upserted through the
stores' own ``upsert_segments``; each size adds points to the same store, then re-optimizes. A query
is what ``use-search query`` does: ``Searcher.embed`` (the CLIP text tower over the 4 prompt
templates, random weights of the real architecture) then ``Searcher.search_vector`` (k hits with
payloads). Text encoding and search are timed separately and together, per query.

The server backend is measured against qdrant-client's in-process ``:memory:`` mode unless
``--qdrant-url`` names a real server: that mode is a brute-force numpy scan in Python, not Qdrant's
engine, so its figures are *not* server figures (DESIGN.md); ``--server-max`` caps its size.
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

from use_search.model.text import TextEncoder  # noqa: E402
from use_search.presets import get_preset  # noqa: E402
from use_search.store.base import segment_payload  # noqa: E402
from use_search.types import SegmentPoint, point_id  # noqa: E402

# A COCO RLE of a typical SAM mask on a 640×480 photo is a few hundred characters.
RLE_COUNTS = "f]^16`>3M3N2N2N1O1O1N2O001O0O1000000O1O1O1N2N2N3L5K^Sk0" * 4


def make_points(start: int, n: int, dim: int, rng: np.random.Generator) -> list[SegmentPoint]:
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    out = []
    for j in range(n):
        i = start + j
        img, seg = divmod(i, 100)  # ~100 segments per image
        sha = f"{img:064x}"
        payload = segment_payload(
            path=f"/photos/{img // 1000:04d}/img{img:07d}.jpg", sha256=sha, width=640, height=480,
            segment_index=seg, n_segments=100, rle={"size": [480, 640], "counts": RLE_COUNTS},
            bbox=(10, 20, 200, 150), area=12345, predicted_iou=0.9, stability_score=0.95, source="auto",
            model="bench", indexed_at="2026-01-01T00:00:00+00:00",
        )
        out.append(SegmentPoint(point_id(sha, seg), vecs[j], payload))
    return out


class Backend:
    def __init__(self, name: str, store, optimize: bool) -> None:
        self.name, self.store, self.optimize_after_load = name, store, optimize
        self.size = 0


def open_backends(names: list[str], dim: int, tmp: Path, qdrant_url: str | None) -> list[Backend]:
    out = []
    for name in names:
        if name == "edge":
            from use_search.store.edge import EdgeStore

            store = EdgeStore(tmp / "edge", "bench")
            out.append(Backend("edge (qdrant-edge, HNSW)", store, True))
        elif name == "server":
            from qdrant_client import QdrantClient

            from use_search.store.server import ServerStore

            if qdrant_url:
                store = ServerStore.connect(qdrant_url, "bench_query")
                label = f"server {qdrant_url}"
            else:
                store = ServerStore(QdrantClient(":memory:"), "bench")
                label = "server (qdrant-client :memory:, brute force)"
            out.append(Backend(label, store, False))
        else:
            raise SystemExit(f"unknown backend {name}")
        out[-1].store.ensure(dim)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "base", "paper"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="10000,100000,300000")
    ap.add_argument("--backends", default="edge,server")
    ap.add_argument("--queries", type=int, default=200, help="timed queries per size (after --warmup)")
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
    rng = np.random.default_rng(0)
    rows, skipped = [], []

    def encode(q: str) -> np.ndarray:
        v = text.encode([q])[0]
        sync(args.device)
        return v

    if dim != clip.dim:
        print(f"note: --dim {dim} differs from the text tower's {clip.dim}: queries are padded/cut random projections")
        proj = rng.standard_normal((clip.dim, dim)).astype(np.float32)
        base_encode = encode

        def encode(q: str) -> np.ndarray:  # type: ignore[no-redef]
            v = base_encode(q) @ proj
            return v / np.linalg.norm(v)

    with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
        backends = open_backends(args.backends.split(","), dim, Path(tmp), args.qdrant_url)
        for size in sizes:
            if args.time_budget and time.perf_counter() - started > args.time_budget:
                skipped.append(f"{size} (time budget of {args.time_budget:.0f} s spent)")
                continue
            for b in backends:
                in_memory = b.name.startswith("server (qdrant-client")
                if in_memory and size > args.server_max:
                    skipped.append(f"{b.name} at {size} (over --server-max {args.server_max})")
                    continue
                rss0 = rss_mb()
                t0 = time.perf_counter()
                batch = 10_000
                for start in range(b.size, size, batch):
                    b.store.upsert_segments(make_points(start, min(batch, size - start), dim, np.random.default_rng(start)))
                load_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                if b.optimize_after_load:
                    b.store.optimize()
                opt_s = time.perf_counter() - t0
                b.size = size
                n_q = args.server_queries if in_memory else args.queries
                t_text, t_search, t_total = [], [], []
                for qi in range(args.warmup + n_q):
                    q = QUERY_TEXTS[qi % len(QUERY_TEXTS)] + ("" if qi < len(QUERY_TEXTS) else f" {qi}")
                    t0 = time.perf_counter()
                    v = encode(q)
                    t1 = time.perf_counter()
                    hits = b.store.search(v, args.k)
                    t2 = time.perf_counter()
                    assert len(hits) == min(args.k, size)
                    if qi >= args.warmup:
                        t_text.append(t1 - t0)
                        t_search.append(t2 - t1)
                        t_total.append(t2 - t0)
                tot, srch, txt = percentiles(t_total), percentiles(t_search), percentiles(t_text)
                rows.append({
                    "backend": b.name, "points": size, "dim": dim, "queries": n_q,
                    "total_p50_ms": tot["p50_ms"], "total_p95_ms": tot["p95_ms"], "total_p99_ms": tot["p99_ms"],
                    "search_p50_ms": srch["p50_ms"], "search_p95_ms": srch["p95_ms"], "search_p99_ms": srch["p99_ms"],
                    "text_p50_ms": txt["p50_ms"], "load_s": load_s, "optimize_s": opt_s,
                    "rss_mb": rss_mb(), "rss_growth_mb": rss_mb() - rss0,
                })
                print_table(f"{b.name} at {size} points", [rows[-1]])
        for b in backends:
            b.store.close()

    print_table(
        f"query latency (text encoding on {args.device} with {clip.arch} random weights + search, k={args.k})",
        [{k: r[k] for k in ("backend", "points", "queries", "total_p50_ms", "total_p95_ms", "total_p99_ms",
                            "search_p50_ms", "search_p95_ms", "search_p99_ms", "text_p50_ms", "load_s", "optimize_s", "rss_mb")}
         for r in rows],
    )
    for s in skipped:
        print(f"skipped: {s}")
    write_json(args.json, {
        "bench": "query", "preset": args.preset, "device": args.device, "text_tower": clip.arch, "dim": dim,
        "k": args.k, "rows": rows, "skipped": skipped, "machine": machine(),
    })


if __name__ == "__main__":
    main()
