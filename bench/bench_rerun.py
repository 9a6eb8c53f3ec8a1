"""Rerunning `index` over a folder that has not changed: time to learn that nothing changed.

    python bench/bench_rerun.py                      # 10,000 generated 640×480 JPEGs
    python bench/bench_rerun.py --files 2000 --size 320x240

The files are generated once into ``--dir`` (kept between runs) and recorded in a fresh embedded store
as a previous ``index`` run leaves them (content hash, pixel size, file size and mtime; one segment point
each), so the timed calls find every file indexed. Timed, side by side, ``--repeats`` times in turn:

- **fast path**: ``Indexer.index(root)``, what ``use-search index`` runs: a file whose size and mtime
  match its record is skipped without being opened;
- **verify**: ``Indexer.index(root, verify=True)`` (``index --verify``): every file read and hashed,
  nothing decoded;
- **before (decode + hash each)**: the per-file work of the runner this replaced, which could skip a
  file only after ``read_image`` (read, decode, hash) and a record lookup. It is re-run here as that
  loop, since the old runner no longer exists.

The indexer gets the tiny preset's segmenter and embedder; a rerun of an unchanged folder never calls
them. Figures are medians over the repeats, in seconds, with files/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, print_table, write_json  # noqa: E402

from use_search.config import Settings  # noqa: E402
from use_search.factory import Runtime  # noqa: E402
from use_search.indexer import Indexer, read_image  # noqa: E402
from use_search.indexer.read import find_images, read_file, sha256_bytes  # noqa: E402
from use_search.indexer.runner import now_iso  # noqa: E402
from use_search.store import EdgeStore  # noqa: E402
from use_search.store.base import ImageEntry, segment_payload  # noqa: E402
from use_search.types import SegmentPoint, point_id  # noqa: E402

EXTS = (".jpg",)


def generate(folder: Path, n: int, width: int, height: int) -> list[Path]:
    """``n`` distinct JPEGs (smooth gradients plus noise, photo-like sizes), 100 per sub-folder."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = rng.normal(0, 12, (2 * height, 2 * width, 3)).astype(np.float32)
    paths = []
    for i in range(n):
        path = folder / f"{i // 100:03d}" / f"img{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0.2, 1.0, 3)
        dy, dx = rng.integers(0, height), rng.integers(0, width)
        base = np.stack([xx * a / width, yy * b / height, (xx + yy) * c / (width + height)], axis=-1) * 255
        pixels = base + noise[dy : dy + height, dx : dx + width]
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def record(store: EdgeStore, paths: list[Path], model: str, dim: int) -> None:
    """The store a previous run leaves: one record and one point per file."""
    vec = np.ones(dim, np.float32) / np.sqrt(dim)
    for start in range(0, len(paths), 500):
        entries, points = [], []
        for path in paths[start : start + 500]:
            data, st = read_file(path)
            sha = sha256_bytes(data)
            with Image.open(path) as im:
                w, h = im.size
            entries.append(ImageEntry(str(path), sha, w, h, 1, model, now_iso(), size=st.st_size, mtime_ns=st.st_mtime_ns))
            rle = {"size": [h, w], "counts": "0"}
            points.append(SegmentPoint(point_id(sha, 0), vec, segment_payload(
                paths=[str(path)], sha256=sha, width=w, height=h, segment_index=0, n_segments=1, rle=rle,
                bbox=(0, 0, w, h), area=w * h, predicted_iou=1.0, stability_score=1.0, source="auto",
                model=model, indexed_at=now_iso(),
            )))
        store.upsert_segments(points)
        store.put_images(entries)


def before_rerun(store: EdgeStore, root: Path, max_pixels: int) -> int:
    """The replaced runner's skip path, file by file: read + decode + hash, then the record lookup."""
    skipped = 0
    for path in find_images(root, EXTS):
        loaded = read_image(path, max_pixels)
        old = store.get_image(loaded.record.path)
        if old is not None and old.sha256 == loaded.record.sha256:
            skipped += 1
    return skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the generated JPEGs")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "use-search-bench-rerun")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-before", action="store_true", help="do not time the decode-everything loop")
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    root = args.dir / f"{args.files}-{width}x{height}"

    t = time.perf_counter()
    paths = generate(root, args.files, width, height)
    print(f"{len(paths)} files under {root} ({time.perf_counter() - t:.1f} s to generate or find)")
    settings = Settings(preset="tiny", device="cpu", offline=True)
    rt = Runtime.from_settings(settings)
    segmenter, embedder = rt.segmenter(), rt.embedder()

    with tempfile.TemporaryDirectory(prefix="bench-rerun-") as tmp, EdgeStore(Path(tmp), "segments") as store:
        store.ensure(embedder.dim)
        t = time.perf_counter()
        record(store, paths, embedder.model_id, embedder.dim)
        print(f"store seeded with {store.count_images()} records in {time.perf_counter() - t:.1f} s")
        indexer = Indexer(store, segmenter, embedder, extensions=EXTS, decode_threads=settings.decode_threads)

        def fast() -> tuple[int, int]:
            r = indexer.index(root, on_total=lambda n: None)  # as the CLI: a counting walk for its progress bar
            return r.skipped, r.hashed

        def verify() -> tuple[int, int]:
            r = indexer.index(root, verify=True, on_total=lambda n: None)
            return r.skipped, r.hashed

        def before() -> tuple[int, int]:
            n = before_rerun(store, root, settings.max_image_pixels)
            return n, n

        modes = {"fast path (index)": fast, "verify (index --verify)": verify}
        if not args.skip_before:
            modes["before: decode + hash each file"] = before
        times: dict[str, list[float]] = {m: [] for m in modes}
        counts: dict[str, tuple[int, int]] = {}
        for _ in range(args.repeats):  # interleaved, so load changes hit every mode alike
            for name, fn in modes.items():
                t = time.perf_counter()
                counts[name] = fn()
                times[name].append(time.perf_counter() - t)

    rows = []
    fast_s = statistics.median(times["fast path (index)"])
    for name in modes:
        s = statistics.median(times[name])
        skipped, hashed = counts[name]
        rows.append({
            "mode": name, "files": len(paths), "skipped": skipped, "files read": hashed, "median s": s,
            "min s": min(times[name]), "files/s": len(paths) / s, "× fast path": s / fast_s,
        })
    print_table(f"rerun over {len(paths)} unchanged {width}×{height} JPEGs (median of {args.repeats})", rows)
    write_json(args.json, {"bench": "rerun", "machine": machine(), "args": {**vars(args), "dir": str(args.dir)}, "rows": rows})


if __name__ == "__main__":
    main()
