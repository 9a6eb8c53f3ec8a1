"""What a first `use-search index` costs on a machine without a GPU: seconds per image end to end for the
`base` and `paper` presets, and the point-grid trade-off (32, 24, 16 points per side) for `base`.

    python bench/bench_first_run.py --images 2 --masks 8 --threads 2 [--arms "base 32,paper 32"] [--json out.json]

Part 1, seconds per image. The parts are built as `use-search index` builds them
(`Runtime.from_settings(settings).indexer(store)`, an embedded store in a scratch folder) from
random-init checkpoints of the real architectures in the official file layouts
(`benchlib.write_random_checkpoints`): the real loading code and the real FLOPs, meaningless outputs.
Every arm indexes the same new photos one at a time, the arms in turns (each image starts one arm
later), so a change in the machine's load hits all arms alike. SAM runs in full with the arm's grid;
random weights pass almost none of SAM's score filters, so its output is replaced by `--masks` fixed
masks per image (bench_index.py's FixedMaskSegmenter) and crop-CLIP embeds that many crops. The
table splits each image's wall time into SAM's stages (the batched engine's own stage clock), the
embedder's and the store's busy time; "embed s/mask" lets a reader scale to another mask count.

Part 2, mask counts per grid. Random weights keep no masks, so the counts come from the stress-test
SAM of tests/amg_stress.py (the tiny SAM edited so that dozens of masks pass SAM's default filters)
on its three real photos: the same filters and NMS as the preset, a proxy for how the mask count
falls with the grid, not a real SAM's counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_index import FixedMaskSegmenter, StageTimer, scratch_weights, write_images  # noqa: E402
from benchlib import machine, print_table, write_json, write_random_checkpoints  # noqa: E402

from use_search.config import Settings, StoreSettings  # noqa: E402
from use_search.factory import Runtime  # noqa: E402

ARMS = {"base 32": ("base", 32), "paper 32": ("paper", 32), "base 24": ("base", 24), "base 16": ("base", 16)}


def build_arm(preset: str, grid: int, tmp: Path, weights: Path, masks: int) -> dict[str, Any]:
    settings = Settings(
        data_dir=tmp / "data", weights_dir=weights, preset=preset, device="cpu", offline=True,
        store=StoreSettings(path=tmp / f"store-{preset}-{grid}"),
    )
    settings = settings.model_copy(update={"amg": settings.amg.model_copy(update={"points_per_side": grid})})
    write_random_checkpoints(preset, settings)
    t0 = time.perf_counter()
    rt = Runtime.from_settings(settings)
    busy: dict[str, float] = {}
    counts: list[int] = []
    segmenter = rt.segmenter()
    embedder = rt.embedder()
    rt.segmenter = lambda: FixedMaskSegmenter(segmenter, masks, busy, "cpu", counts)  # type: ignore[method-assign]
    rt.embedder = lambda: StageTimer(embedder, "embed", ("embed_segments", "embed_batch"), busy, "cpu")  # type: ignore[method-assign]
    store = rt.store()
    indexer = rt.indexer(StageTimer(store, "write", ("upsert_segments", "put_image"), busy, "cpu"))
    return {"rt": rt, "segmenter": segmenter, "indexer": indexer, "store": store, "busy": busy,
            "counts": counts, "load_s": time.perf_counter() - t0, "samples": []}


def index_one(arm: dict[str, Any], folder: Path) -> dict[str, float]:
    arm["busy"].clear()
    arm["segmenter"].reset_stats()
    t0 = time.perf_counter()
    report = arm["indexer"].index(folder)
    wall = time.perf_counter() - t0
    if report.indexed != 1 or report.failed:
        raise SystemExit(f"indexed {report.indexed} of 1; failed: {report.failed}")
    row = {"wall_s": wall, **{f"sam {k}": v for k, v in arm["segmenter"].stage_seconds.items()}}
    row.update({k: v for k, v in arm["busy"].items() if k != "masks"})
    row["sam total"] = arm["busy"].get("masks", 0.0)
    return row


def stress_counts(grids: list[int]) -> list[dict[str, Any]]:
    from amg_stress import stress_images, stress_sam

    from use_search.presets import get_preset
    from use_search.segmenter import BatchedAutoSegmenter, auto_mask_params

    rows = []
    images = stress_images()
    for grid in grids:
        settings = Settings(preset="base", device="cpu")
        settings = settings.model_copy(update={"amg": settings.amg.model_copy(update={"points_per_side": grid})})
        seg = BatchedAutoSegmenter(stress_sam(), auto_mask_params(settings, get_preset("base")))
        counts = [len(seg.segment(im)) for im in images]
        rows.append({"grid": grid, "masks per photo (VOC, astronaut, colorwheel)": ", ".join(map(str, counts)),
                     "mean": statistics.mean(counts)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2, help="photos indexed per arm")
    ap.add_argument("--masks", type=int, default=32, help="fixed masks per image embedded by crop-CLIP")
    ap.add_argument("--side", type=int, default=640, help="longest side of the photos")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from: {', '.join(ARMS)}")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [a.strip() for a in args.arms.split(",") if a.strip()]

    result: dict[str, Any] = {"bench": "first-run", "args": vars(args), "machine": machine()}
    result["stress_counts"] = stress_counts(sorted({ARMS[n][1] for n in names if ARMS[n][0] == "base"} | {32}, reverse=True))
    print_table("masks kept per photo by the stress-test SAM (base thresholds 0.88 / 0.95, NMS 0.7)", result["stress_counts"])

    with tempfile.TemporaryDirectory(prefix="bench-first-run-") as tmp_name:
        tmp = Path(tmp_name)
        weights = scratch_weights(None, tmp)
        arms = {}
        for n in names:
            arms[n] = build_arm(*ARMS[n], tmp, weights, args.masks)
            print(f"{n}: models loaded in {arms[n]['load_s']:.1f} s", file=sys.stderr, flush=True)
        for i in range(args.images):
            for n in names[i % len(names):] + names[: i % len(names)]:
                folder = tmp / f"img{i}-{n.replace(' ', '-')}"
                write_images(folder, 1, args.side, offset=1000 * i + len(arms[n]["samples"]) + 100 * names.index(n))
                arms[n]["samples"].append(index_one(arms[n], folder))
                # Each image's split as it lands, so that a run cut short still says where the time went.
                print(f"image {i} {n}: {arms[n]['samples'][-1]['wall_s']:.1f} s  "
                      + json.dumps({"image": i, "arm": n, **arms[n]["samples"][-1]}), file=sys.stderr, flush=True)
        for arm in arms.values():
            arm["store"].close()

    rows = []
    for n, arm in arms.items():
        keys = list(dict.fromkeys(k for s in arm["samples"] for k in s))
        mean = {k: statistics.mean(s.get(k, 0.0) for s in arm["samples"]) for k in keys}
        rows.append({
            "arm": n, "s/image (mean)": mean["wall_s"], "per image": ", ".join(f"{s['wall_s']:.1f}" for s in arm["samples"]),
            "SAM s": mean["sam total"], "encoder s": mean.get("sam encoder", 0.0),
            "decoder+filter+nms s": sum(mean.get(f"sam {k}", 0.0) for k in ("decoder", "filter", "nms", "masks")),
            "embed s": mean.get("embed", 0.0), "embed s/mask": mean.get("embed", 0.0) / max(args.masks, 1),
            "write s": mean.get("write", 0.0), "load s": arm["load_s"],
        })
    result["rows"] = rows
    by = {r["arm"]: r["s/image (mean)"] for r in rows}
    turns = {n: [s["wall_s"] for s in arms[n]["samples"]] for n in arms}
    if "base 32" in by and "paper 32" in by:
        result["paper_over_base"] = [p / b for p, b in zip(turns["paper 32"], turns["base 32"])]
    print_table(
        f"`index` on CPU, {args.images} photos per arm (long side {args.side}), {args.masks} masks/image embedded "
        f"(crop-CLIP), random weights in the real architectures, arms in turns", rows,
    )
    if "paper_over_base" in result:
        print("\npaper / base s/image, per image: " + ", ".join(f"{x:.2f}" for x in result["paper_over_base"]))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
