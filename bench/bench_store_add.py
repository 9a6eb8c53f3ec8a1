"""Adding a few images to a large embedded store: the store's share of an `index` run, old build policy
against the new one, side by side in one run.

    python bench/bench_store_add.py                                   # 100 images × 100 segments into 100,000 points
    python bench/bench_store_add.py --base-points 30000 --max-segment-mb 32   # smaller, same proportions

A base store of ``--base-points`` 512-d points with indexer-shaped payloads (path, folders, sha256, an
RLE of a few hundred characters, bbox, scores) and their image records is built and optimized once,
as a store created before this change (engine-default segments), then copied twice. On each copy the
same ``--images`` × ``--segments-per-image`` new points are written as ``Indexer`` commits them
(``commit``, ``--batch-images`` images per commit) and the run ends with ``store.optimize()`` as
``use-search index`` does:

- **old**: the store as it was (qdrant's default segment size, CPUs × 256 MB): the build after the run
  merges the new points into the big segment and rebuilds its whole HNSW graph;
- **new**: the store opened with ``store.max_segment_mb`` (``--max-segment-mb``, default the settings'
  default): the new points get a graph of their own.

Reported per policy: open, write and optimize seconds (end to end = all three plus close), engine
segments, indexed points, search p50 over ``--queries`` random queries, and whether each added point
finds itself first (a search over points added after the last build must stay correct).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, percentiles, print_table, write_json  # noqa: E402

from use_search.config import StoreSettings  # noqa: E402
from use_search.indexer.runner import ImageEvent, Write, commit, now_iso  # noqa: E402
from use_search.store import EdgeStore  # noqa: E402
from use_search.store.base import ImageEntry, segment_payload  # noqa: E402
from use_search.types import SegmentPoint, point_id  # noqa: E402

MODEL = "bench:random"


def image_points(rng: np.random.Generator, image: int, n: int, dim: int, tag: str) -> tuple[ImageEntry, list[SegmentPoint]]:
    path = f"/photos/{tag}/{image // 1000:03d}/img{image:06d}.jpg"
    sha = f"{tag}{image:012d}".ljust(64, "0")
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rle = {"size": [480, 640], "counts": "".join(rng.choice(list("0123456789abcdefghij"), 300))}
    points = [
        SegmentPoint(point_id(sha, i), vectors[i], segment_payload(
            path=path, sha256=sha, width=640, height=480, segment_index=i, n_segments=n, rle=rle,
            bbox=(i % 600, i % 400, 40, 30), area=1200, predicted_iou=0.9, stability_score=0.95, source="auto",
            model=MODEL, indexed_at=now_iso(),
        ))
        for i in range(n)
    ]
    return ImageEntry(path, sha, 640, 480, n, MODEL, now_iso(), size=100_000, mtime_ns=0), points


def build_base(folder: Path, points: int, per_image: int, dim: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    with EdgeStore(folder, "segments", max_segment_mb=None, min_free_bytes=0) as store:  # as created before
        store.ensure(dim)
        for start in range(0, points // per_image, 50):
            pairs = [image_points(rng, i, per_image, dim, "base") for i in range(start, min(start + 50, points // per_image))]
            store.upsert_segments([p for _, pts in pairs for p in pts])
            store.put_images([e for e, _ in pairs])
        insert_s = time.perf_counter() - t
        t = time.perf_counter()
        store.optimize()
        return {"insert_s": insert_s, "optimize_s": time.perf_counter() - t, **store.index_info()}


def add_run(folder: Path, max_segment_mb: int | None, images: int, per_image: int, dim: int, batch: int) -> dict:
    """What ``use-search index`` does to the store for ``images`` new images: open, commits, optimize, close."""
    rng = np.random.default_rng(1)
    new = [image_points(rng, i, per_image, dim, "added") for i in range(images)]
    t0 = time.perf_counter()
    store = EdgeStore(folder, "segments", max_segment_mb=max_segment_mb, min_free_bytes=0)
    t1 = time.perf_counter()
    for start in range(0, images, batch):
        commit(store, [
            Write(ImageEvent(e.path, "indexed", len(pts)), entry=e, points=pts, fresh=True)
            for e, pts in new[start : start + batch]
        ])
    t2 = time.perf_counter()
    store.optimize()
    t3 = time.perf_counter()
    store.close()
    t4 = time.perf_counter()
    return {
        "open_s": t1 - t0, "write_s": t2 - t1, "optimize_s": t3 - t2, "end_to_end_s": t4 - t0,
        "added": [p for _, pts in new for p in pts],
    }


def check(folder: Path, max_segment_mb: int | None, added: list[SegmentPoint], queries: int, dim: int) -> dict:
    rng = np.random.default_rng(2)
    with EdgeStore(folder, "segments", max_segment_mb=max_segment_mb, min_free_bytes=0) as store:
        info = store.index_info()
        sample = added[:: max(1, len(added) // 200)]
        found = sum(store.search(p.vector, k=1)[0].id == p.id for p in sample)
        for q in rng.normal(size=(10, dim)):  # warm-up
            store.search(q, k=10)
        times = []
        for q in rng.normal(size=(queries, dim)).astype(np.float32):
            t = time.perf_counter()
            store.search(q, k=10)
            times.append(time.perf_counter() - t)
    return {**info, "added_found_first": f"{found}/{len(sample)}", "search_p50_ms": percentiles(times)["p50_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-points", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--segments-per-image", type=int, default=100)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch-images", type=int, default=4, help="images per commit (settings.batch_images)")
    ap.add_argument("--max-segment-mb", type=int, default=StoreSettings().max_segment_mb)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--base-dir", type=Path, help="keep the optimized base store here and reuse it on later runs")
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-store-add-") as tmp:
        tmp_path = Path(tmp)
        base = args.base_dir or tmp_path / "base"
        marker = base / f"built-{args.base_points}-{args.segments_per_image}-{args.dim}"
        if marker.exists():
            base_info = {"insert_s": float("nan"), "optimize_s": float("nan"), "reused": str(base)}
        else:
            shutil.rmtree(base, ignore_errors=True)
            base_info = build_base(base, args.base_points, args.segments_per_image, args.dim)
            marker.touch()
        print(f"base store: {base_info}")
        rows = []
        for policy, cap in (("old: engine-default segments", None), (f"new: max_segment_mb={args.max_segment_mb}", args.max_segment_mb)):
            folder = tmp_path / ("old" if cap is None else "new")
            shutil.copytree(base, folder)
            run = add_run(folder, cap, args.images, args.segments_per_image, args.dim, args.batch_images)
            after = check(folder, cap, run.pop("added"), args.queries, args.dim)
            rows.append({"policy": policy, "base points": args.base_points,
                         "added points": args.images * args.segments_per_image, **run, **after})
            shutil.rmtree(folder)
    old_s, new_s = rows[0]["end_to_end_s"], rows[1]["end_to_end_s"]
    print_table(
        f"add {args.images} images × {args.segments_per_image} segments ({args.dim}-d) to a {args.base_points:,}-point store",
        rows,
    )
    print(f"\nend to end: old {old_s:.1f} s, new {new_s:.1f} s ({old_s / new_s:.1f}× faster)")
    write_json(args.json, {"bench": "store_add", "machine": machine(), "args": {**vars(args), "base_dir": str(args.base_dir)},
                           "base": base_info, "rows": rows})


if __name__ == "__main__":
    main()
