"""Indexing throughput: images/s end to end with a per-stage breakdown (decode, masks, embed, upsert)
and peak memory.

    python bench/bench_index.py --preset paper --device cuda --images 32           # GPU, full-size archs
    python bench/bench_index.py --preset tiny --device cpu --images 4 --side 256   # CPU smoke figures

The stages are the indexer's own, called one image at a time as ``Indexer.index`` calls them:
``read_image`` (file → RGB + sha256), ``AutoSegmenter.segment`` (SAM automatic masks),
``Embedder.embed_segments`` (crop-CLIP, the default embedder) and the write stage (``segment_points`` +
``upsert_segments`` + ``put_image``) into an embedded store in a temp folder (``--store server`` for
qdrant-client's in-process ``:memory:`` mode).

Random weights in the preset's real architectures: SAM's confidence filters then keep few or no masks,
so by default the embed and upsert stages get a fixed set of ``--masks`` deterministic masks per image
(DESIGN.md: mask-count-dependent stages are measured with a fixed mask set); ``--masks 0`` feeds them
SAM's own output. ``--keep-all-masks`` zeroes SAM's score thresholds, so every grid mask goes through
the RLE / NMS post-processing (the worst case for the masks stage; the tiny preset always does this).
The first ``--warmup`` images are run but not counted.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    StageClock, fixed_masks, machine, peak_rss_mb, percentiles, photos, print_table, random_clip, random_sam,
    rss_mb, sam_arch, write_json,
)

from use_search.config import Settings  # noqa: E402
from use_search.indexer import read_image, segment_points  # noqa: E402
from use_search.model.crop_clip import CropClipEmbedder  # noqa: E402
from use_search.presets import get_preset  # noqa: E402
from use_search.segmenter import AutoSegmenter, auto_mask_params  # noqa: E402
from use_search.store.base import ImageEntry  # noqa: E402
from use_search.indexer.runner import now_iso  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "base", "paper"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=4, help="images counted (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--side", type=int, default=640, help="longest side of the test photos (COCO-like: 640)")
    ap.add_argument("--folder", type=Path, help="index these images instead of the built-in photos")
    ap.add_argument("--masks", type=int, default=100, help="fixed masks per image for embed/upsert; 0 = SAM's own")
    ap.add_argument("--keep-all-masks", action="store_true", help="SAM score thresholds 0: every grid mask is post-processed")
    ap.add_argument("--points-per-side", type=int, help="override the preset's point grid")
    ap.add_argument("--points-per-batch", type=int, default=64)
    ap.add_argument("--embed-batch", type=int, default=64, help="crop-CLIP crops per forward")
    ap.add_argument("--store", choices=["edge", "server"], default="edge")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    preset = get_preset(args.preset)
    settings = Settings(preset=args.preset, device=args.device, offline=True)
    amg = settings.amg.model_copy(update={"points_per_batch": args.points_per_batch})
    if args.points_per_side:
        amg = amg.model_copy(update={"points_per_side": args.points_per_side})
    if args.keep_all_masks:
        amg = amg.model_copy(update={"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
    settings = settings.model_copy(update={"amg": amg})
    params = auto_mask_params(settings, preset)

    t0 = time.perf_counter()
    segmenter = AutoSegmenter(random_sam(preset.sam, args.device), params)
    clip = random_clip(preset.clip, args.device)
    embedder = CropClipEmbedder(clip, args.device, batch=args.embed_batch, untrained=True)
    load_s = time.perf_counter() - t0
    rss_models = rss_mb()

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        tmp = Path(tmp)
        files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")) if args.folder else []
        if not args.folder:
            for i, rgb in enumerate(photos(args.side)):
                Image.fromarray(rgb).save(tmp / f"photo{i}.jpg", quality=90)
            files = sorted(tmp.glob("photo*.jpg"))
        if not files:
            raise SystemExit("no images")
        if args.store == "edge":
            from use_search.store.edge import EdgeStore

            store = EdgeStore(tmp / "store", "bench")
        else:
            from qdrant_client import QdrantClient

            from use_search.store.server import ServerStore

            store = ServerStore(QdrantClient(":memory:"), "bench")
        store.ensure(embedder.dim)
        if str(args.device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

        clock = StageClock(args.device)
        n_total = args.warmup + args.images
        sam_masks, rss_trace = [], []
        wall0 = None
        for i in range(n_total):
            if i == args.warmup:
                clock.samples.clear()
                sam_masks.clear()
                wall0 = time.perf_counter()
            path = files[i % len(files)]
            clock.start()
            loaded = read_image(path, settings.max_image_pixels)
            # Repeated photos must not share point ids: make each pass a distinct image.
            loaded.record = type(loaded.record)(f"{loaded.record.path}#{i}", hashlib.sha256(f"{loaded.record.sha256}{i}".encode()).hexdigest(),
                                                loaded.record.width, loaded.record.height)
            clock.lap("decode")
            with torch.inference_mode():
                segments = segmenter.segment(loaded.pixels)
            clock.lap("masks")
            sam_masks.append(len(segments))
            if args.masks > 0:
                h, w = loaded.pixels.shape[:2]
                segments = fixed_masks(args.masks, h, w, seed=i % len(files))
                clock.start()  # building the fixed set is not a stage of the indexer
            vectors = embedder.embed_segments(loaded.pixels, segments)
            clock.lap("embed")
            points = segment_points(loaded, segments, vectors, embedder.model_id)
            if points:
                store.upsert_segments(points)
            r = loaded.record
            store.put_image(ImageEntry(r.path, r.sha256, r.width, r.height, len(points), embedder.model_id, now_iso()))
            clock.lap("upsert")
            rss_trace.append(rss_mb())
        wall = time.perf_counter() - wall0
        n_points = store.count_segments()
        store.close()

    stage_ms = {k: float(np.mean(v) * 1000) for k, v in clock.samples.items()}
    total_ms = sum(stage_ms.values())
    rows = [
        {"stage": k, "ms/image": v, "share_%": 100 * v / total_ms, **{k2: v2 for k2, v2 in percentiles(clock.samples[k]).items() if k2 != "mean_ms"}}
        for k, v in stage_ms.items()
    ]
    result = {
        "bench": "index", "preset": args.preset, "device": args.device, "sam_arch": sam_arch(preset.sam),
        "clip": clip.arch, "images": args.images, "side": args.side, "store": args.store,
        "points_per_side": params.points_per_side, "keep_all_masks": args.keep_all_masks,
        "masks_per_image_embedded": args.masks if args.masks > 0 else float(np.mean(sam_masks)),
        "sam_masks_per_image": float(np.mean(sam_masks)),
        "images_per_s": args.images / wall, "stage_ms": stage_ms, "points": n_points,
        "load_s": load_s, "rss_after_models_mb": rss_models, "rss_first_mb": rss_trace[args.warmup] if len(rss_trace) > args.warmup else None,
        "rss_last_mb": rss_trace[-1], "peak_rss_mb": peak_rss_mb(),
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if str(args.device).startswith("cuda") else None,
        "machine": machine(),
    }
    print_table(
        f"indexing, preset {args.preset} ({result['sam_arch']} + crop-CLIP {clip.arch}, random weights) on {args.device}: "
        f"{result['images_per_s']:.3f} images/s over {args.images} images",
        rows,
    )
    print_table("summary", [{
        "images/s": result["images_per_s"], "SAM masks/img": result["sam_masks_per_image"],
        "embedded masks/img": result["masks_per_image_embedded"], "peak RSS MB": result["peak_rss_mb"],
        "RSS first→last MB": f"{result['rss_first_mb']:.0f}→{result['rss_last_mb']:.0f}" if result["rss_first_mb"] else "-",
        "GPU peak MB": result["gpu_peak_mb"],
    }])
    write_json(args.json, result)


if __name__ == "__main__":
    main()
