"""Indexing camera-size photos: `use-search index` as a user runs it (a fresh process per run), at the
working size (the default: images segmented and embedded at the segmenter's input size, masks stored at
the original size) against full resolution (`USE_SEARCH_WORK_SIDE=0`, what every run did before).

Each arm indexes the same folder of `--images` JPEGs of `--size` into a fresh store, `--runs` times in
alternating order; the table gives the median wall time per image (process start included) and the
process's peak resident memory (from wait4). `--preset base` writes random-init checkpoints of the real
SAM ViT-B / CLIP ViT-B/16 architectures to a scratch folder first (real FLOPs, meaningless masks).
The full-size work is per mask that passes SAM's score filters, and random ViT-B weights pass almost
none: `--keep-all-masks` (thresholds 0) shows what masks that pass cost, as real weights' would.

    python bench/bench_big_photos.py --size 4032x3024 --images 3 --runs 2 [--preset base] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

ARMS = {"working size (default)": {}, "full resolution (work_side=0)": {"USE_SEARCH_WORK_SIDE": "0"}}


def write_photos(folder: Path, n: int, width: int, height: int) -> None:
    folder.mkdir(parents=True)
    for i, rgb in enumerate(benchlib.photos(max(width, height))[:n]):
        Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.Resampling.BILINEAR).save(
            folder / f"photo{i}.jpg", quality=90
        )


def run_index(env: dict[str, str], folder: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one `index` process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "use_search", "index", str(folder)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"index failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "base"])
    ap.add_argument("--size", default="4032x3024", help="WIDTHxHEIGHT of the photos (a 12 MP phone photo by default)")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--points-per-side", type=int, help="SAM's point grid (default: the preset's)")
    ap.add_argument("--keep-all-masks", action="store_true",
                    help="SAM score thresholds 0: every grid mask is post-processed (random weights pass none otherwise)")
    ap.add_argument("--json")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        folder = tmp_path / "photos"
        write_photos(folder, args.images, width, height)
        weights = tmp_path / "weights"
        if args.preset == "base":
            from use_search.config import Settings

            benchlib.write_random_checkpoints("base", Settings(data_dir=tmp_path / "w", weights_dir=weights, offline=True))
        amg = {"USE_SEARCH_AMG__POINTS_PER_SIDE": str(args.points_per_side)} if args.points_per_side else {}
        if args.keep_all_masks:
            amg |= {"USE_SEARCH_AMG__PRED_IOU_THRESH": "0", "USE_SEARCH_AMG__STABILITY_SCORE_THRESH": "0"}
        samples: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
        for r in range(args.runs):
            for arm in (list(ARMS) if r % 2 == 0 else list(ARMS)[::-1]):
                env = {
                    **os.environ, "PYTHONPATH": str(REPO), "USE_SEARCH_PRESET": args.preset, "USE_SEARCH_OFFLINE": "1",
                    "USE_SEARCH_DATA_DIR": str(tmp_path / f"data-{r}-{len(samples[arm])}-{hash(arm) & 0xFFFF}"),
                    "USE_SEARCH_WEIGHTS_DIR": str(weights), "USE_SEARCH_CONFIG": "/nonexistent", **amg, **ARMS[arm],
                }
                samples[arm].append(run_index(env, folder))
                print(f"run {r} {arm}: {samples[arm][-1][0]:.1f} s, {samples[arm][-1][1]:.0f} MB", file=sys.stderr)

    rows = []
    for arm, got in samples.items():
        rows.append({
            "arm": arm, "s/image (median)": statistics.median(w for w, _ in got) / args.images,
            "peak RSS MB (max)": max(m for _, m in got),
        })
    base = rows[0]["s/image (median)"]
    for row in rows:
        row["time vs default"] = row["s/image (median)"] / base
    benchlib.print_table(
        f"index {args.images} × {width}×{height} JPEG, preset {args.preset}, {args.runs} runs each, process start "
        f"included, grid {args.points_per_side or 'preset'}{', all masks kept' if args.keep_all_masks else ''}",
        rows,
    )
    benchlib.write_json(args.json, {"machine": benchlib.machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
