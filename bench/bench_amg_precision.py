#!/usr/bin/env python
"""What ``precision="fast"`` (the CUDA default: bf16 encoder/decoder, fp16 mask upscaling, SDPA) does
to the automatic masks, against ``precision="exact"`` (float32, segment-anything's arithmetic: its masks
up to pixels whose logit lies within float32 rounding of the mask threshold). Runs on CPU by forcing those dtypes, so it needs no GPU.

    python bench/bench_amg_precision.py                       # tiny SAM, 3 photos, 12×12 grid
    python bench/bench_amg_precision.py --arch vit_b --side 512 --images 2
    python bench/bench_amg_precision.py --recipe local      # unedited tiny SAM, thresholds 0

``--recipe stress`` (default): a random SAM with the edits of tests/amg_stress.py, so dozens of masks
survive SAM's default thresholds per image. Its logits are the small prompt-dependent remainder of
large cancelling terms (×1e4), a worst case for bf16. ``--recipe local``: the unedited random SAM,
``mask_threshold`` 0.09 (local blobs), IoU/stability thresholds 0 and NMS 0.7. Masks are paired by Hungarian matching on mask IoU; per image it prints mask
counts, how many are RLE-identical, the median and minimum IoU of matched pairs and how many masks
each side has without a twin (IoU 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from amg_stress import hungarian, stress_images, stress_sam  # noqa: E402
from benchlib import write_json  # noqa: E402

from use_search.segmenter.automatic import AutoMaskParams  # noqa: E402
from use_search.segmenter.batched import BatchedAutoSegmenter, BatchOptions  # noqa: E402

FAST = BatchOptions(dtype="bfloat16", upscale_dtype="float16", sdpa=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="tiny", help="tiny, vit_b, vit_l, vit_h")
    ap.add_argument("--recipe", choices=["stress", "local"], default="stress")
    ap.add_argument("--side", type=int, default=160)
    ap.add_argument("--points-per-side", type=int, default=12)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--min-areas", default="0,100")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recipe == "stress":
        sam = stress_sam(args.points_per_side, args.side, arch=args.arch)
        thresholds = {}
    else:
        sam = stress_sam(args.points_per_side, args.side, k=1.0, t=0.09, a=1.0, arch=args.arch, edit=False)
        thresholds = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    images = stress_images(args.side)[: args.images]
    rows = []
    for min_area in (int(v) for v in args.min_areas.split(",")):
        params = AutoMaskParams(
            points_per_side=args.points_per_side, min_mask_region_area=min_area, precision="exact", **thresholds
        )
        exact, fast = BatchedAutoSegmenter(sam, params), BatchedAutoSegmenter(sam, params, FAST)
        for i, image in enumerate(images):
            t0 = time.perf_counter()
            a = exact.segment(image)
            t1 = time.perf_counter()
            b = fast.segment(image)
            t2 = time.perf_counter()
            ious, only_exact, only_fast = hungarian([s.rle for s in a], [s.rle for s in b])
            same = len({s.rle["counts"] for s in a} & {s.rle["counts"] for s in b})
            rows.append({
                "image": i, "min_area": min_area, "exact_masks": len(a), "fast_masks": len(b), "rle_equal": same,
                "median_iou": float(np.median(ious)) if len(ious) else None,
                "min_iou": float(ious.min()) if len(ious) else None,
                "iou_ge_0.9": int((ious >= 0.9).sum()), "only_exact": only_exact, "only_fast": only_fast,
                "exact_s": t1 - t0, "fast_s": t2 - t1,
            })
            r = rows[-1]
            iou = f"median {r['median_iou']:.3f} min {r['min_iou']:.3f}" if len(ious) else "none"
            print(f"min_area={min_area:<4} image {i}: exact {len(a):3d} fast {len(b):3d}  RLE-equal {same:3d}  "
                  f"matched IoU {iou} (≥0.9: {r['iou_ge_0.9']})  unmatched exact/fast {only_exact}/{only_fast}")
    med = [r["median_iou"] for r in rows if r["median_iou"] is not None]
    mins = [r["min_iou"] for r in rows if r["min_iou"] is not None]
    worst = max(max(r["only_exact"], r["only_fast"]) for r in rows)
    if med:
        print(f"\nover {len(rows)} image runs: median of medians {np.median(med):.3f}, worst min IoU {min(mins):.3f}, "
              f"unmatched per image up to {worst}")
    write_json(args.json, {"bench": "amg_precision", "arch": args.arch, "recipe": args.recipe, "side": args.side,
                           "points_per_side": args.points_per_side, "rows": rows})


if __name__ == "__main__":
    main()
