"""Stores at scale: the embedded store's settings (quantization, on-disk vectors and payloads, segment
cap) at 100k-1M segments of 768-d, with the indexer's payloads.

    nice -n 10 python bench/bench_scale.py --sizes 100000 --settings none-ram,none,int8,binary,turbo4
    nice -n 10 python bench/bench_scale.py --sizes 300000 --settings int8 --json out.json

Vectors: bench_query.py's Gaussian mixture (every query has a real neighbourhood). Payloads: the
indexer's ``segment_payload`` with real COCO RLEs of wobbly blobs on a 640×480 photo (their mean size
is printed), 100 segments per image. Each (size, setting) is two fresh subprocesses, so that their
memory is their own:

- build: a new store, the points written in batches of ``--batch`` through ``upsert_segments`` (the
  store builds its index every ``max_segment_mb`` of vectors), image records, ``optimize()``. Reported:
  insert rate, the whole build's time, its peak RSS, the engine segments on disk (count, largest) and
  the store's bytes on disk per point.
- query: open the store as a reader (RSS after open), ``--queries`` searches of k=10 with payloads
  and masks, the same without masks (the mask fetched for no hit), RSS after them; recall@10 against a
  numpy brute force over all vectors. For quantized stores also other search tunings (rescore off,
  oversampling 1 / 2 / 4) on the same open store.

Settings (``store.*``): none-ram = float vectors in RAM, payload where the engine puts it (stores
before quantization); none = float vectors and payloads on disk; int8 / binary / turbo4 = that
quantization in RAM, float vectors and payloads on disk (rescoring reads them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import SEGMENTS_PER_IMAGE, Mixture, folder_of, make_points  # noqa: E402
from use_search.masks import encode_rle  # noqa: E402
from use_search.store import EdgeStore, ImageEntry  # noqa: E402
from use_search.store.layout import SearchTuning  # noqa: E402
from use_search.types import point_id  # noqa: E402

SETTINGS = {
    "none-ram": {"quantization": "none", "vectors_on_disk": False, "payload_on_disk": None},
    "none": {"quantization": "none", "vectors_on_disk": True, "payload_on_disk": True},
    "int8": {"quantization": "int8", "vectors_on_disk": True, "payload_on_disk": True},
    "binary": {"quantization": "binary", "vectors_on_disk": True, "payload_on_disk": True},
    "turbo4": {"quantization": "turbo4", "vectors_on_disk": True, "payload_on_disk": True},
}
TUNINGS = [SearchTuning(False, 1.0), SearchTuning(True, 1.0), SearchTuning(True, 2.0), SearchTuning(True, 4.0)]
CENTRES = 1000
K = 10
N_MASKS = 64


def rss_mb() -> float:
    """This process's resident set, MiB (benchlib's, which this module does not import: it loads torch)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def percentiles(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95))}


def masks(seed: int = 0) -> list[dict]:
    """Wobbly blobs on a 640×480 photo: COCO RLEs of the size SAM's masks have (~600-900 bytes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:480, :640]
    out = []
    for i in range(N_MASKS):
        cx, cy = rng.uniform(150, 490), rng.uniform(120, 360)
        a, b = rng.uniform(40, 150, 2)
        ang = np.arctan2(yy - cy, xx - cx)
        r = 1 + 0.15 * np.sin(5 * ang + i) + 0.06 * np.sin(17 * ang) + 0.03 * np.sin(41 * ang + i)
        out.append(encode_rle(((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 < r**2))
    return out


def disk_bytes(root: Path) -> int:
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(root) for f in fs)


def build(args: argparse.Namespace) -> dict:
    mix, rles = Mixture(CENTRES, args.dim), masks()
    store = EdgeStore(Path(args.dir), "segments", layout=SETTINGS[args.setting], max_segment_mb=args.cap_mb, min_free_bytes=0)
    store.ensure(args.dim)
    t0 = time.perf_counter()
    for start in range(0, args.n, args.batch):
        n = min(args.batch, args.n - start)
        store.upsert_segments(make_points(start, mix.points(start, n), rles))
    store.put_images([
        ImageEntry(f"{folder_of(i * SEGMENTS_PER_IMAGE)}/img{i:07d}.jpg", f"{i:064x}", 640, 480, SEGMENTS_PER_IMAGE,
                   "bench", "2026-01-01T00:00:00+00:00")
        for i in range(-(-args.n // SEGMENTS_PER_IMAGE))
    ])
    written = time.perf_counter() - t0
    store.optimize()
    total = time.perf_counter() - t0
    info = store.index_info()
    store.close()
    seg_root = Path(args.dir) / "segments" / "segments" / "segments"
    sizes = sorted((disk_bytes(p) for p in seg_root.iterdir()), reverse=True)
    return {
        "insert_pts_s": args.n / written, "build_s": total, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "segments": info["segments"], "indexed": info["indexed"], "largest_segment_mb": sizes[0] / 2**20,
        "disk_mb": disk_bytes(Path(args.dir)) / 2**20, "disk_bytes_per_point": disk_bytes(Path(args.dir)) / args.n,
        "rle_bytes_mean": float(np.mean([len(json.dumps(r)) for r in rles])),
    }


def timed_search(store: EdgeStore, queries: np.ndarray, masks: bool) -> tuple[list[float], list[list[str]], int]:
    times, ids, moved = [], [], 0
    for q in queries:
        t = time.perf_counter()
        hits = store.search(q, K, masks=masks)
        times.append(time.perf_counter() - t)
        ids.append([h.id for h in hits])
        moved += sum(len(json.dumps(h.payload)) for h in hits)
    return times, ids, moved // len(queries)


def query(args: argparse.Namespace) -> dict:
    queries = Mixture(CENTRES, args.dim).queries(args.queries)
    exact = json.loads(Path(args.exact).read_text())
    before = rss_mb()
    store = EdgeStore(Path(args.dir), "segments", writable=False)
    out: dict = {"rss_python_mb": before, "rss_open_mb": rss_mb()}

    def recall(ids: list[list[str]]) -> float:
        return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, exact)]))

    for masks_on in (True, False):
        times, ids, moved = timed_search(store, queries, masks_on)
        tag = "masks" if masks_on else "nomasks"
        p = percentiles(times)
        out.update({f"p50_{tag}_ms": p["p50_ms"], f"p95_{tag}_ms": p["p95_ms"], f"bytes_per_search_{tag}": moved * 1})
        out["recall@10"] = recall(ids)
    out["rss_after_mb"] = rss_mb()
    if store.layout is not None and store.layout.quantization != "none":
        for tuning in TUNINGS:
            store._tuning = tuning  # the same open store, another search tuning
            times, ids, _ = timed_search(store, queries, False)
            out[f"rescore={tuning.rescore},os={tuning.oversampling:g}"] = {"recall@10": recall(ids), "p50_ms": percentiles(times)["p50_ms"]}
    store.close()
    return out


def rle_cost(n: int = 20_000, dim: int = 64) -> dict:
    """What the masks cost on disk: the same n points with and without ``rle`` in their payloads (float
    vectors and payloads on disk, no HNSW), bytes per point of the payload storage and of the store."""
    mix, rles = Mixture(100, dim), masks()
    out = {"rle_json_bytes": float(np.mean([len(json.dumps(r)) for r in rles]))}
    for with_rle in (True, False):
        with tempfile.TemporaryDirectory() as d:
            store = EdgeStore(Path(d), "segments", layout=SETTINGS["none"], max_segment_mb=None, min_free_bytes=0)
            store.ensure(dim)
            for start in range(0, n, 4096):
                points = make_points(start, mix.points(start, min(4096, n - start)), rles)
                for p in points if not with_rle else []:
                    p.payload.pop("rle")
                store.upsert_segments(points)
            store.optimize()
            store.close()
            payload = sum(disk_bytes(Path(dp)) for dp, _, _ in os.walk(d) if Path(dp).name == "payload_storage")
            tag = "with_rle" if with_rle else "without_rle"
            out[f"payload_bytes_per_point_{tag}"] = payload / n
            out[f"store_bytes_per_point_{tag}"] = disk_bytes(Path(d)) / n
    return out


def exact_ids(n: int, dim: int, n_queries: int, batch: int) -> list[list[str]]:
    """Brute-force top k of every query over all n points, streamed in the build's batches."""
    mix = Mixture(CENTRES, dim)
    queries = mix.queries(n_queries)
    best_s = np.full((n_queries, K), -np.inf, np.float32)
    best_i = np.zeros((n_queries, K), np.int64)
    for start in range(0, n, batch):
        v = mix.points(start, min(batch, n - start))
        s = np.concatenate([best_s, queries @ v.T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(v)), (n_queries, len(v)))], axis=1)
        top = np.argpartition(-s, K - 1, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return [[point_id(f"{p // SEGMENTS_PER_IMAGE:064x}", p % SEGMENTS_PER_IMAGE) for p in row] for row in best_i]


def child(mode: str, **kw) -> dict:
    cmd = [sys.executable, __file__, f"--{mode}"] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--caps", default="128", help="store.max_segment_mb values (latency vs segment count)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--work", default=None, help="folder for the stores (default: a temporary one)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--rle-cost", action="store_true", help="only measure the masks' bytes on disk per point")
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--query", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="int8", help=argparse.SUPPRESS)
    ap.add_argument("--cap-mb", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--exact", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build or args.query:
        print(json.dumps(build(args) if args.build else query(args)))
        return
    from benchlib import machine, print_table, write_json

    if args.rle_cost:
        print(json.dumps(rle_cost()))
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for n in map(int, args.sizes.split(",")):
            t = time.perf_counter()
            exact = Path(work, f"exact-{n}.json")
            exact.write_text(json.dumps(exact_ids(n, args.dim, args.queries, args.batch)))
            print(f"exact top {K} over {n}: {time.perf_counter() - t:.1f} s", flush=True)
            for setting in args.settings.split(","):
                for cap in map(int, args.caps.split(",")):
                    d = Path(work, f"{setting}-{n}-{cap}")
                    common = dict(dim=args.dim, dir=d)
                    row = {"n": n, "setting": setting, "cap_mb": cap}
                    row.update(child("build", n=n, setting=setting, cap_mb=cap, batch=args.batch, **common))
                    row.update(child("query", queries=args.queries, exact=exact, **common))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    subprocess.run(["rm", "-rf", str(d)], check=True)
    flat = [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows]
    print_table("stores at scale (embedded)", flat)
    write_json(args.json, {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
