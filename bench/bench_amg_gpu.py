#!/usr/bin/env python
"""Automatic masks: segment-anything's ``SamAutomaticMaskGenerator`` (the reference) vs our
``BatchedAutoSegmenter``, images/s and per-stage times, on random weights (same FLOPs as the real ones).

On the GPU host (H100), the paper preset's SAM::

    python bench/bench_amg_gpu.py --device cuda --arch vit_h --images 32 --ref-images 2 --json amg_h100.json

Smoke run on CPU with the tiny SAM::

    python bench/bench_amg_gpu.py --device cpu --arch tiny --side 256 --points-per-side 8 --images 4 --ref-images 2

Modes (``--modes``):
- ``default``: segment-anything's thresholds (IoU 0.88, stability 0.95, NMS 0.7). Random weights pass
  almost nothing through them, so this measures encoder + decoder + the IoU filter.
- ``relaxed``: IoU and stability thresholds 0: every candidate (3 per prompt, 3072 for a 32×32 grid)
  is upscaled to full size, scored and boxed — a fixed candidate set that does not depend on the
  weights — then NMS 0.7 decides what is kept; kept counts are reported with the times.

Reference stage split: "encoder" is ``SamPredictor.set_image``; "rest" is everything else in
``generate`` (decoder, filtering, NMS, RLE). Ours: preprocess (PIL resize), encoder, decoder,
filter (upscale + stability + boxes of every candidate), nms, masks (kept masks at full size, RLE,
copy to host), from a second, synchronised (``profile``) pass. Equivalence (our masks vs the
reference's on the reference images, one-to-one by mask IoU) is printed too: ``--precision exact``
(float32, segment-anything's attention arithmetic) should give identical masks up to the float32
kernels the GPU picks; the CUDA default ``fast`` (bf16 / fp16) moves mask borders and close calls
(bench/bench_amg_precision.py measures by how much). ``--crop-layers 1`` runs segment-anything's crop
layer (the whole image plus 4 crops, each encoded) in both.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from use_search.masks import iou_matrix  # noqa: E402
from use_search.segmenter.automatic import AutoMaskParams, AutoSegmenter  # noqa: E402
from use_search.segmenter.batched import BatchedAutoSegmenter, BatchOptions  # noqa: E402
from use_search.segmenter.sam import SAM_ARCHS, build_sam  # noqa: E402

from benchlib import photos  # noqa: E402

MODES = {
    "default": dict(pred_iou_thresh=0.88, stability_score_thresh=0.95, box_nms_thresh=0.7),
    "relaxed": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.7),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_reference(sam, params: AutoMaskParams, images, device: str, bf16: bool) -> tuple[dict, list]:
    seg = AutoSegmenter(sam, params)
    predictor = seg.generator.predictor
    encoder_s = [0.0]
    set_image = predictor.set_image

    def timed_set_image(*a, **k):
        sync(device)
        t = time.perf_counter()
        set_image(*a, **k)
        sync(device)
        encoder_s[0] += time.perf_counter() - t

    predictor.set_image = timed_set_image
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.startswith("cuda") else _null()
    with ctx:
        seg.segment(images[0])  # warm-up
        encoder_s[0] = 0.0
        sync(device)
        t = time.perf_counter()
        results = [seg.segment(im) for im in images]
        sync(device)
        total = time.perf_counter() - t
    n = len(images)
    return {
        "images": n,
        "images_per_s": n / total,
        "s_per_image": total / n,
        "stage_s_per_image": {"encoder": encoder_s[0] / n, "rest": (total - encoder_s[0]) / n},
        "masks_per_image": sum(len(r) for r in results) / n,
    }, results


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def run_ours(sam, params: AutoMaskParams, images, device: str, opts: BatchOptions, stages: bool) -> tuple[dict, list]:
    seg = BatchedAutoSegmenter(sam, params, opts)
    seg.segment_batch(images[: seg.image_batch])  # warm-up (and compile, with --compile)
    sync(device)
    seg.reset_stats()
    t = time.perf_counter()
    results = seg.segment_batch(images)
    sync(device)
    total = time.perf_counter() - t
    n = len(images)
    out = {
        "images": n,
        "images_per_s": n / total,
        "s_per_image": total / n,
        "candidates_per_image": seg.counts["candidates"] / n,
        "masks_per_image": sum(len(r) for r in results) / n,
    }
    if device.startswith("cuda"):
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if stages:
        prof = BatchedAutoSegmenter(sam, params, BatchOptions(**{**opts.__dict__, "profile": True}))
        prof.segment_batch(images[: prof.image_batch])
        prof.reset_stats()
        prof.segment_batch(images)
        out["stage_s_per_image"] = {k: v / n for k, v in prof.stage_seconds.items()}
    return out, results


def equivalence(ref: list, ours: list) -> dict:
    matched = []
    for r, o in zip(ref, ours):
        if not r:
            continue
        if not o:
            matched.extend([0.0] * len(r))
            continue
        ious = iou_matrix([s.rle for s in r], [s.rle for s in o])
        used_r, used_o, best = set(), set(), np.zeros(len(r))
        for flat in np.argsort(-ious, axis=None, kind="stable"):
            i, j = np.unravel_index(flat, ious.shape)
            if i not in used_r and j not in used_o:
                used_r.add(i)
                used_o.add(j)
                best[i] = ious[i, j]
        matched.extend(best.tolist())
    m = np.asarray(matched)
    return {
        "ref_masks": int(sum(len(r) for r in ref)),
        "our_masks": int(sum(len(o) for o in ours[: len(ref)])),
        "frac_iou_ge_0.99": float((m >= 0.99).mean()) if len(m) else None,
        "min_iou": float(m.min()) if len(m) else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="vit_h", choices=sorted(SAM_ARCHS))
    ap.add_argument("--images", type=int, default=32, help="images for our segmenter")
    ap.add_argument("--ref-images", type=int, default=2, help="images for the reference (slow); 0 skips it")
    ap.add_argument("--side", type=int, default=1024, help="long side of the test photos (pixels)")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--modes", default="default,relaxed")
    ap.add_argument("--image-batch", type=int, default=0, help="0: 8 on CUDA, 1 on CPU")
    ap.add_argument("--decode-batch", type=int, default=0, help="0: 1024 on CUDA, 128 on CPU")
    ap.add_argument("--precision", default="auto", choices=["auto", "fast", "exact"], help="AutoMaskParams.precision")
    ap.add_argument("--dtype", default="auto", help="override: auto (from --precision), float32, bfloat16, float16")
    ap.add_argument("--crop-layers", type=int, default=0, help="crop_n_layers (segment-anything's crops)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our encoder and decoder")
    ap.add_argument("--ref-bf16", action="store_true", help="run the reference under bf16 autocast")
    ap.add_argument("--no-stages", action="store_true", help="skip the synchronised per-stage pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sam = build_sam(args.arch).to(args.device)
    base = photos(args.side)
    images = [base[i % len(base)] for i in range(max(args.images, args.ref_images))]
    opts = BatchOptions(
        image_batch=args.image_batch, decode_batch=args.decode_batch, dtype=args.dtype, compile=args.compile
    )
    machine = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    report = {
        "command": " ".join(["python", *sys.argv]),
        "args": vars(args) | {"json": str(args.json) if args.json else None},
        "machine": machine,
        "modes": {},
    }
    print(f"SAM {args.arch} (random weights) on {machine['device']}; photos long side {args.side}; "
          f"{args.points_per_side}² prompts")
    for mode in args.modes.split(","):
        params = AutoMaskParams(
            points_per_side=args.points_per_side, crop_n_layers=args.crop_layers, precision=args.precision, **MODES[mode]
        )
        entry = {}
        ours, our_masks = run_ours(sam, params, images[: args.images], args.device, opts, not args.no_stages)
        entry["ours"] = ours
        if args.ref_images:
            ref, ref_masks = run_reference(sam, params, images[: args.ref_images], args.device, args.ref_bf16)
            entry["reference"] = ref
            entry["speedup"] = ours["images_per_s"] / ref["images_per_s"]
            entry["equivalence"] = equivalence(ref_masks, our_masks[: args.ref_images])
        report["modes"][mode] = entry
        print(f"\n[{mode}] {params}")
        print(f"  ours      {ours['images_per_s']:8.2f} img/s  {ours['masks_per_image']:.1f} masks/img "
              f"({ours['candidates_per_image']:.0f} candidates after filters)")
        for k, v in ours.get("stage_s_per_image", {}).items():
            print(f"      {k:<10} {v * 1000:9.1f} ms/img")
        if "reference" in entry:
            ref = entry["reference"]
            print(f"  reference {ref['images_per_s']:8.2f} img/s  {ref['masks_per_image']:.1f} masks/img")
            for k, v in ref["stage_s_per_image"].items():
                print(f"      {k:<10} {v * 1000:9.1f} ms/img")
            print(f"  speed-up  {entry['speedup']:.1f}×   equivalence {entry['equivalence']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
