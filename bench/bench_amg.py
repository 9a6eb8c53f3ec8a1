"""Reference automatic masks: segment-anything's ``SamAutomaticMaskGenerator``, timed per image, split
into the image encoder (``set_image``) and the rest (grid prompts → mask decoder → filtering → RLE →
NMS). This is the baseline that the project's batched automatic-mask path (``segmenter/batched.py``) is
compared against.

    python bench/bench_amg.py --arch vit_h --device cuda --images 8                 # GPU, SAM ViT-H
    python bench/bench_amg.py --arch tiny --device cpu --images 2 --side 256        # CPU, tiny SAM

Random weights in the real architecture. SAM's score filters then drop most masks, which would make
the post-processing look cheap, so by default the thresholds are 0 (``--thresholds preset`` keeps
segment-anything's 0.88 / 0.95): every one of the points_per_side² × 3 masks is thresholded,
RLE-encoded and goes through NMS (the worst case; a trained SAM keeps ~100-200 of them before NMS).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, percentiles, photos, print_table, random_sam, sync, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="tiny", help="tiny, vit_b, vit_l, vit_h (or sam_vit_h ...)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--side", type=int, default=640)
    ap.add_argument("--points-per-side", type=int, help="default: 8 for tiny, 32 otherwise (segment-anything's)")
    ap.add_argument("--points-per-batch", type=int, default=64)
    ap.add_argument("--thresholds", choices=["zero", "preset"], default="zero")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from segment_anything import SamAutomaticMaskGenerator

    name = args.arch if args.arch == "tiny" or args.arch.startswith("sam_") else f"sam_{args.arch}"
    sam = random_sam(name, args.device)
    pps = args.points_per_side or (8 if args.arch == "tiny" else 32)
    zero = args.thresholds == "zero"
    gen = SamAutomaticMaskGenerator(
        sam, points_per_side=pps, points_per_batch=args.points_per_batch,
        pred_iou_thresh=0.0 if zero else 0.88, stability_score_thresh=0.0 if zero else 0.95, output_mode="binary_mask",
    )
    imgs = photos(args.side)
    enc, total, n_masks = [], [], []
    for i in range(args.warmup + args.images):
        img = imgs[i % len(imgs)]
        with torch.inference_mode():
            sync(args.device)
            t0 = time.perf_counter()
            gen.predictor.set_image(img)
            sync(args.device)
            t1 = time.perf_counter()
            masks = gen.generate(img)  # runs set_image again inside: subtract the encoder once
            sync(args.device)
            t2 = time.perf_counter()
        if i >= args.warmup:
            enc.append(t1 - t0)
            total.append(t2 - t1)
            n_masks.append(len(masks))
    e, t = percentiles(enc), percentiles(total)
    row = {
        "arch": args.arch, "device": args.device, "side": args.side, "grid": f"{pps}x{pps}", "thresholds": args.thresholds,
        "images": args.images, "s/image": t["mean_ms"] / 1000, "images/s": 1000 / t["mean_ms"],
        "encoder_ms": e["mean_ms"], "decode+post_ms": t["mean_ms"] - e["mean_ms"], "masks_out": float(np.mean(n_masks)),
    }
    print_table("segment-anything SamAutomaticMaskGenerator (reference), random weights", [row])
    write_json(args.json, {"bench": "amg_reference", **row, "total": t, "encoder": e, "machine": machine()})


if __name__ == "__main__":
    main()
