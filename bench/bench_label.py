"""`use-search label` (§4.3 voting over the stored masks and vectors) against `segment` on the same images.

    nice python bench/bench_label.py [--images 10000] [--segments 50] [--classes 20] [--size 640x480]
                                     [--sample 2] [--segment-presets tiny,base] [--json out.json]

1. An embedded store written here: ``--images`` contents × ``--segments`` points, each with a real COCO RLE
   of a ``--size`` mask (drawn from a pool of 500 masks of ``benchlib.fixed_masks``: ellipses and boxes from
   0.2% to 30% of the image, several per pixel, as SAM's nested masks are), a random unit vector of the
   tiny preset's width, and the tiny preset's model id; one image record per content.
2. `use-search --preset tiny label --classes C1..Cn --out labels.jsonl` over it, as a user runs it (a
   fresh process; wall time, peak memory of the process). The class names are embedded with the tiny
   text tower (a real CLIP's text tower costs more, once per run, not per image).
3. `segment` on ``--sample`` real photos of the same size, per preset: the parts `segment` builds
   (tiny, or random-init checkpoints of the real architectures for base: real FLOPs, meaningless
   outputs), SAM in full with the preset's grid, its output replaced by ``--segments`` fixed masks
   (random weights pass almost none of SAM's filters, see bench_first_run.py) which crop-CLIP embeds,
   then the vote. Seconds per image, times ``--images``: an extrapolation, said so in the table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_index import FixedMaskSegmenter, scratch_weights  # noqa: E402
from benchlib import fixed_masks, machine, photos, print_table, write_json, write_random_checkpoints  # noqa: E402

from use_search.config import Settings, StoreSettings  # noqa: E402
from use_search.factory import Runtime, load_ensemble  # noqa: E402
from use_search.store import EdgeStore  # noqa: E402
from use_search.store.base import ImageEntry, segment_payload  # noqa: E402
from use_search.types import SegmentPoint, point_id  # noqa: E402

POOL = 500
CLASS_NAMES = ("cat dog sofa person car tree sky road grass building chair table bed window door floor wall "
               "bicycle boat bird horse sheep cow bottle plant train bus").split()


def settings(tmp: Path, preset: str = "tiny", weights: Path | None = None) -> Settings:
    return Settings(data_dir=tmp / "data", preset=preset, device="cpu", offline=True,
                    store=StoreSettings(path=tmp / "store"), **({"weights_dir": weights} if weights else {}))


def build_store(args: argparse.Namespace, tmp: Path) -> dict:
    width, height = (int(v) for v in args.size.lower().split("x"))
    embedder = Runtime.from_settings(settings(tmp)).query_embedder()
    t0 = time.perf_counter()
    pool = [s.rle for s in fixed_masks(POOL, height, width, seed=1)]
    rng = np.random.default_rng(0)
    store = EdgeStore(tmp / "store", "segments")
    store.ensure(embedder.dim)
    batch: list[SegmentPoint] = []
    records: list[ImageEntry] = []
    for i in range(args.images):
        sha = hashlib.sha256(f"image-{i}".encode()).hexdigest()
        path = f"/library/{i // 1000:03d}/{i:06d}.jpg"
        vecs = rng.normal(size=(args.segments, embedder.dim)).astype(np.float32)
        for j, m in enumerate(rng.choice(POOL, size=args.segments, replace=False)):
            batch.append(SegmentPoint(point_id(sha, j), vecs[j], segment_payload(
                paths=[path], sha256=sha, width=width, height=height, segment_index=j, n_segments=args.segments,
                rle=pool[m], bbox=(0, 0, width, height), area=1, predicted_iou=0.9, stability_score=0.95,
                source="auto", model=embedder.model_id, indexed_at="2026-01-01T00:00:00+00:00")))
        records.append(ImageEntry(path, sha, width, height, args.segments, embedder.model_id, "2026-01-01T00:00:00+00:00"))
        if len(batch) >= 5000 or i == args.images - 1:
            store.upsert_segments(batch)
            store.put_images(records)
            batch, records = [], []
    store.close()  # no optimize(): label reads points by id, it never searches (no HNSW needed)
    rle_bytes = sum(len(r["counts"]) for r in pool) / POOL
    return {"build_s": round(time.perf_counter() - t0, 1), "dim": embedder.dim, "rle_chars_mean": round(rle_bytes)}


def run_label(args: argparse.Namespace, tmp: Path) -> dict:
    names = ",".join(CLASS_NAMES[: args.classes])
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(tmp / "data"), "USE_SEARCH_STORE__PATH": str(tmp / "store"),
           "USE_SEARCH_CONFIG": "/nonexistent", "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "use_search", "--preset", "tiny", "label", "--classes", names, "--out", str(tmp / "labels.jsonl")]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines = sum(1 for _ in (tmp / "labels.jsonl").open())
    print(run.stdout, file=sys.stderr)
    return {"wall_s": round(wall, 1), "images": lines, "ms_per_image": round(1000 * wall / max(lines, 1), 2),
            "peak_rss_mb": round(peak_mb)}


def time_segment(preset: str, args: argparse.Namespace, tmp: Path) -> dict:
    from use_search.voting.predict import segment_by_voting

    weights = scratch_weights(None, tmp / preset) if preset != "tiny" else None
    s = settings(tmp / preset, preset, weights)
    if preset != "tiny":
        s = s.model_copy(update={"amg": s.amg.model_copy(update={"points_per_side": 16})})  # what auto picks on a CPU
        write_random_checkpoints(preset, s)
    rt = Runtime.from_settings(s)
    segmenter = FixedMaskSegmenter(rt.segmenter(), args.segments, {}, "cpu", [])
    ensemble = load_ensemble(s)
    width, height = (int(v) for v in args.size.lower().split("x"))
    images = [p for p in photos(max(width, height)) if p.shape[:2] == (height, width)] or photos(max(width, height))
    names = list(CLASS_NAMES[: args.classes])
    segment_by_voting(images[0], names, segmenter, ensemble, s.voting)  # class vectors cached, as a server's are
    times = []
    for img in images[: args.sample]:
        t0 = time.perf_counter()
        segment_by_voting(img, names, segmenter, ensemble, s.voting)
        times.append(time.perf_counter() - t0)
    per = sum(times) / len(times)
    return {"preset": preset, "sample": len(times), "s_per_image": round(per, 2),
            "extrapolated_h": round(per * args.images / 3600, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--segments", type=int, default=50)
    ap.add_argument("--classes", type=int, default=20, choices=range(1, len(CLASS_NAMES) + 1), metavar="N")
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--sample", type=int, default=2, help="Images `segment` runs on, per preset.")
    ap.add_argument("--segment-presets", default="tiny,base")
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        built = build_store(args, tmp)
        print(f"store: {args.images} images × {args.segments} segments written in {built['build_s']} s", file=sys.stderr)
        label = run_label(args, tmp)
        seg = [time_segment(p, args, tmp) for p in args.segment_presets.split(",") if p]
    rows = [{"command": f"label ({args.classes} classes, CLI)", "images": label["images"], "s/image": label["ms_per_image"] / 1000,
             "total": f"{label['wall_s']} s (measured)", "peak RSS MB": label["peak_rss_mb"], "segment / label": 1}]
    for r in seg:
        total_s = r["s_per_image"] * args.images
        rows.append({"command": f"segment, {r['preset']} ({args.segments} masks)", "images": args.images,
                     "s/image": r["s_per_image"], "total": f"{r['extrapolated_h']} h (from {r['sample']} images)",
                     "peak RSS MB": "", "segment / label": round(total_s / label["wall_s"])})
    print_table(f"label vs segment: {args.images} images of {args.size}, {args.segments} segments", rows)
    write_json(args.json, {"machine": machine(), "args": vars(args), "store": built, "label": label, "segment": seg})


if __name__ == "__main__":
    main()
