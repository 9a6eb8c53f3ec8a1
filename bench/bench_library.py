"""The content-addressed library: what a move, a no-change rerun and a path filter cost.

    python bench/bench_library.py                              # all three parts
    python bench/bench_library.py --parts move --files 1000
    python bench/bench_library.py --parts filter --contents 2000

- **move**: ``--files`` generated JPEGs (``--size``, 100 per sub-folder) indexed with the ``tiny`` preset
  (the first index: decode, segment, embed), then the folder renamed and indexed again under its new
  name: known content becomes new references (hashing, one payload update per content), nothing is
  decoded. Then ``prune`` of the old name. Seconds of each, and files hashed / decoded.
- **rerun**: ``use-search --preset tiny index`` as a user runs it (a fresh process) over ``--rerun-files``
  generated files, already indexed (recorded as ``bench_rerun.py`` does: a record and one point per
  file, with the tiny model's id), against ``use-search stats`` (start, settings, open the store) and
  ``python -c "import use_search"``; median of ``--repeats``. A no-change rerun loads no model.
- **filter**: an embedded store of ``--contents`` contents × ``--segments`` random points, each content
  listed under one path, or under three (two copies in other folders): search latency (k=10) with no
  filter, a path filter and a folder filter (both match elements of the ``paths`` / ``dirs`` arrays, with
  keyword payload indexes), and the content-hash filter (a plain keyword) for comparison; and the cost
  of adding one reference (a payload update of a content's points by filter).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rerun import generate  # noqa: E402
from benchlib import machine, print_table, write_json  # noqa: E402

from use_search.config import Settings, StoreSettings  # noqa: E402
from use_search.store import EdgeStore, SearchFilter  # noqa: E402
from use_search.store.base import ImageEntry, segment_payload  # noqa: E402
from use_search.types import SegmentPoint, point_id  # noqa: E402


def bench_move(args: argparse.Namespace, work: Path) -> list[dict]:
    from use_search.factory import Runtime

    width, height = (int(v) for v in args.size.lower().split("x"))
    root = work / "photos"
    generate(root, args.files, width, height)
    settings = Settings(data_dir=work / "data", preset="tiny", device="cpu", offline=True,
                        store=StoreSettings(path=work / "data" / "store"), image_extensions=(".jpg",))
    rt = Runtime.from_settings(settings)
    rows = []
    with rt.store() as store:
        ix = rt.indexer(store)
        t = time.perf_counter()
        first = ix.index(root)
        rows.append({"run": "first index", "files": args.files, "seconds": time.perf_counter() - t,
                     "hashed": first.hashed, "decoded": first.decoded, "segments added": first.segments})
        moved = work / "photos-moved"
        root.rename(moved)
        t = time.perf_counter()
        again = rt.indexer(store).index(moved)
        rows.append({"run": "after moving the folder", "files": args.files, "seconds": time.perf_counter() - t,
                     "hashed": again.hashed, "decoded": again.decoded, "segments added": again.segments})
        t = time.perf_counter()
        pruned = rt.indexer(store).index(root, prune=True)
        rows.append({"run": "index OLD --prune", "files": pruned.pruned_images, "seconds": time.perf_counter() - t,
                     "hashed": 0, "decoded": 0, "segments added": 0})
        assert again.decoded == 0 and again.copies == args.files and pruned.pruned_segments == 0
    moved.rename(root)  # the rerun part uses the store as a user left it: paths under photos-moved
    for r in rows:
        r["× first index"] = r["seconds"] / rows[0]["seconds"]
    print_table(f"moving an indexed folder of {args.files} {args.size} JPEGs (tiny preset, CPU)", rows)
    return rows


def bench_rerun(args: argparse.Namespace, work: Path) -> list[dict]:
    """Fresh processes: the CLI's no-change rerun over ``--rerun-files`` files vs importing the package."""
    width, height = (int(v) for v in args.size.lower().split("x"))
    root = work / "rerun"
    generate(root, args.rerun_files, width, height)
    from bench_rerun import record

    from use_search.factory import Runtime

    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(work / "rerun-data"), "USE_SEARCH_CONFIG": "/nonexistent"}
    embedder = Runtime.from_settings(Settings(preset="tiny", device="cpu", offline=True)).embedder()
    with EdgeStore(work / "rerun-data" / "store", "segments") as store:
        store.ensure(embedder.dim)
        record(store, sorted(root.rglob("*.jpg")), embedder.model_id, embedder.dim)
    cli = [sys.executable, "-m", "use_search", "--preset", "tiny", "--device", "cpu", "index", str(root)]
    commands = {
        f"use-search --preset tiny index (no change, {args.rerun_files} files)": cli,
        "use-search --preset tiny stats (opens the store)": cli[:5] + ["stats"],
        'python -c "import use_search"': [sys.executable, "-c", "import use_search"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            t = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            times[name].append(time.perf_counter() - t)
            assert r.returncode == 0, r.stderr
            assert "index" not in name or re.search(r"already indexed \(skipped\)\W+%d\b" % args.rerun_files, r.stderr), r.stderr
    floor = statistics.median(times['python -c "import use_search"'])
    rows = [{"command": k, "median s": statistics.median(v), "min s": min(v), "× import": statistics.median(v) / floor}
            for k, v in times.items()]
    print_table(f"no-change rerun against importing the package (fresh processes, median of {args.repeats})", rows)
    return rows


def bench_filter(args: argparse.Namespace, work: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    dim, rows = 64, []
    for copies in (1, 3):
        with EdgeStore(work / f"filter-{copies}", "segments") as store:
            store.ensure(dim)
            points, entries = [], []
            for c in range(args.contents):
                sha = f"{c:064x}"
                paths = [f"/photos/f{c % 100:02d}/img{c:06d}.jpg"] + [
                    f"/copies{k}/f{c % 100:02d}/img{c:06d}.jpg" for k in range(1, copies)
                ]
                for i in range(args.segments):
                    points.append(SegmentPoint(point_id(sha, i), rng.normal(size=dim).astype(np.float32), segment_payload(
                        paths=paths, sha256=sha, width=64, height=64, segment_index=i, n_segments=args.segments,
                        rle={"size": [64, 64], "counts": "0"}, bbox=(0, 0, 64, 64), area=4096, predicted_iou=1.0,
                        stability_score=1.0, source="auto", model="bench", indexed_at="",
                    )))
                entries += [ImageEntry(p, sha, 64, 64, args.segments, "bench", "") for p in paths]
                if len(points) >= 5000:
                    store.upsert_segments(points)
                    points = []
            store.upsert_segments(points)
            store.put_images(entries)
            store.optimize()
            queries = rng.normal(size=(args.queries, dim)).astype(np.float32)
            filters = {
                "no filter": None,
                "path (paths array)": SearchFilter(path="/photos/f07/img000107.jpg"),
                "folder, 1% (dirs array)": SearchFilter(under="/photos/f07"),
                "content hash (keyword)": SearchFilter(sha256=f"{107:064x}"),
            }
            for name, flt in filters.items():
                samples = []
                for q in queries:
                    t = time.perf_counter()
                    hits = store.search(q, 10, flt)
                    samples.append(time.perf_counter() - t)
                assert hits
                rows.append({"paths per content": copies, "points": store.count_segments(), "filter": name,
                             "p50 ms": 1e3 * statistics.median(samples), "max ms": 1e3 * max(samples)})
            samples = []
            for c in range(5):  # alone: one write (and its fsync) for one reference
                t = time.perf_counter()
                store.add_reference(f"/moved/img{c:06d}.jpg", f"{c:064x}")
                samples.append(time.perf_counter() - t)
            rows.append({"paths per content": copies, "points": store.count_segments(),
                         "filter": f"add 1 reference ({args.segments} points), alone",
                         "p50 ms": 1e3 * statistics.median(samples), "max ms": 1e3 * max(samples)})
            n = min(256, args.contents - 5)  # as a commit adds them: 256 references in one write
            t = time.perf_counter()
            store.add_references([(f"/moved/img{c:06d}.jpg", f"{c:064x}") for c in range(5, 5 + n)])
            per = 1e3 * (time.perf_counter() - t) / n
            rows.append({"paths per content": copies, "points": store.count_segments(),
                         "filter": f"add {n} references in one write, per reference", "p50 ms": per, "max ms": per})
    print_table(f"path and folder filters on {args.contents} contents × {args.segments} points (embedded store)", rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="move,rerun,filter")
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--rerun-files", type=int, default=500)
    ap.add_argument("--size", default="96x72", help="WIDTHxHEIGHT of the generated JPEGs")
    ap.add_argument("--contents", type=int, default=2000)
    ap.add_argument("--segments", type=int, default=50)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()
    parts = args.parts.split(",")
    out = {}
    work = Path(tempfile.mkdtemp(prefix="bench-library-"))
    try:
        if "move" in parts:
            out["move"] = bench_move(args, work)
        if "rerun" in parts:
            out["rerun"] = bench_rerun(args, work)
        if "filter" in parts:
            out["filter"] = bench_filter(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, {"bench": "library", "machine": machine(), "args": vars(args), **out})


if __name__ == "__main__":
    main()
