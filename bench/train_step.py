"""Training-step throughput and peak memory of the USE model (paper §4.2 recipe).

    python bench/train_step.py --preset paper --device cuda --batch 32          # paper recipe: 560 crops
    python bench/train_step.py --preset paper --device cuda --batch 32 --cached # feature-cache mode
    python bench/train_step.py --preset tiny --device cpu --batch 4 --steps 3   # smoke run

Random weights in the preset's real architectures (same FLOPs as the real models). Each step is the
training loop's own ``contrastive_step``: frozen towers under no_grad (bf16 autocast on CUDA) →
LLNs, scales and head → eq. (1) → AdamW; ``--cached`` feeds stored backbone features instead of
images, as ``TrainConfig(feature_cache=...)`` does. Every image carries ``--segments`` masks of
varied size; texts are distinct random unit vectors (the real loop embeds each text once and caches it).
Prints a summary and one JSON line (``--json FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from use_search.model.geometry import segment_patch_weights
from use_search.train.data import Batch
from use_search.train.loop import contrastive_step

from benchlib import sync, write_json  # noqa: E402  (same folder)
from benchlib import fixed_masks, random_use_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper", choices=["paper", "base", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32, help="images per step (paper: 32)")
    ap.add_argument("--crop", type=int, default=None, help="crop side; default grid × CLIP patch (paper: 560)")
    ap.add_argument("--segments", type=int, default=10, help="masks per image")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cached", action="store_true", help="cached backbone features instead of images")
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()
    dev = args.device
    amp = dev.startswith("cuda")

    model = random_use_model(args.preset, dev)
    cfg = model.config
    crop = args.crop or cfg.grid * model.backbones.clip_patch
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, crop, crop), dtype=torch.uint8, generator=g)
    masks = [fixed_masks(args.segments, crop, crop, seed=i) for i in range(args.batch)]
    weights = torch.from_numpy(np.stack([segment_patch_weights([s.mask for s in m], cfg.grid, side=crop) for m in masks]))
    valid = torch.ones(args.batch, args.segments, dtype=torch.bool)
    k = args.batch * args.segments
    txt = F.normalize(torch.randn(k, cfg.clip_embed_dim, generator=g), dim=-1).to(dev)
    ids = torch.arange(k, device=dev)
    texts = [str(i) for i in range(k)]

    features = None
    if args.cached:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            feats = model.backbones(images.to(dev).float() / 255.0)
        features = [{n: v.half().clone() for n, v in feats.per_image(i).items()} for i in range(args.batch)]
        del feats
    batch = Batch(None if args.cached else images.to(dev), features, weights.to(dev), valid.to(dev), texts)

    model.trainable.train()
    optimizer = torch.optim.AdamW(model.trainable.parameters(), lr=1e-3, weight_decay=0.01)

    def step() -> float:
        return contrastive_step(model, model.trainable, optimizer, batch, txt, ids, logit_scale=30.0, amp=amp)

    for _ in range(args.warmup):
        step()
    sync(dev)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    sync(dev)
    seconds = (time.perf_counter() - start) / args.steps
    trainable = sum(p.numel() for p in model.trainable.parameters())
    result = {
        "bench": "train_step", "preset": args.preset, "device": dev,
        "device_name": torch.cuda.get_device_name(0) if dev.startswith("cuda") else platform.processor() or platform.machine(),
        "torch": torch.__version__, "bf16_autocast": amp, "cached_features": args.cached,
        "batch_images": args.batch, "crop": crop, "grid": cfg.grid, "segments_per_image": args.segments,
        "trainable_params": trainable, "steps_per_s": 1 / seconds, "images_per_s": args.batch / seconds,
        "segments_per_s": k / seconds, "s_per_step": seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None,
        "loss_first_last": [losses[0], losses[-1]],
    }
    mem = f", peak {result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else ""
    print(f"{args.preset} on {result['device_name']} ({dev}, bf16 autocast: {amp}, cached features: {args.cached})")
    print(f"  batch {args.batch} × {crop}px crops, {args.segments} segments/image, {trainable / 1e6:.2f}M trainable: "
          f"{result['steps_per_s']:.3g} steps/s, {result['images_per_s']:.3g} images/s{mem}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
