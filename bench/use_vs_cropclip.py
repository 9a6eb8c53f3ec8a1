"""USE encoder throughput, and seconds per image for USE vs crop-CLIP on the same fixed masks.

    python bench/use_vs_cropclip.py --preset paper --device cuda            # the issue-3 figures (GPU)
    python bench/use_vs_cropclip.py --preset tiny --device cpu --images 2   # smoke run

Random weights in the preset's real architectures (the FLOPs are those of the real models; no
checkpoint is needed or loaded). Both embedders get the same image and the same ``--masks`` masks
(deterministic shapes), one image at a time, as the indexer calls them. USE: one encoder pass +
pooling of all masks; crop-CLIP: one CLIP pass per mask (batched ``--crop-batch`` at a time).
Prints a table and one JSON line (``--json FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import numpy as np
import open_clip
import torch

from use_search.config import Settings
from use_search.model.clip import ClipBundle, build_clip, load_clip
from use_search.model.crop_clip import CropClipEmbedder
from use_search.model.dinov2 import Dinov2Bundle, build_dinov2, build_tiny_dinov2
from use_search.model.use import DEFAULT_GRID, UseEmbedder, UseModel, describe_backbones
from use_search.presets import get_preset
from use_search.types import Segment
from use_search.weights import REGISTRY

from benchlib import sync, write_json  # noqa: E402  (same folder)


def random_backbones(preset_name: str, grid: int, device: str) -> tuple[ClipBundle, Dinov2Bundle]:
    """The preset's CLIP and DINOv2 architectures with random weights, built on ``device``."""
    preset = get_preset(preset_name)
    if preset.clip == "tiny":
        clip = load_clip("tiny", Settings(), device=device)
    else:
        arch = REGISTRY[preset.clip].arch
        with torch.device(device):
            model = build_clip(arch).eval()
        size = model.visual.image_size
        cfg = model.visual.preprocess_cfg
        clip = ClipBundle(
            model=model, tokenizer=open_clip.get_tokenizer(arch), arch=arch, model_id=f"random-{arch}",
            image_size=size[0] if isinstance(size, (tuple, list)) else int(size),
            mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)), std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        )
    if preset.dinov2 == "tiny":
        dino = Dinov2Bundle(build_tiny_dinov2(grid).to(device).eval(), "use-tiny-dinov2", "tiny", 14)
    else:
        arch = REGISTRY[preset.dinov2].arch
        with torch.device(device):
            dino = Dinov2Bundle(build_dinov2(arch, grid).eval(), arch, f"random-{arch}", 14)
    return clip, dino


def random_use_model(preset_name: str, device: str, grid: int | None = None) -> UseModel:
    grid = grid or DEFAULT_GRID[preset_name]
    clip, dino = random_backbones(preset_name, grid, device)
    config = describe_backbones(clip, dino, grid=grid, dinov2_blocks=get_preset(preset_name).dinov2_blocks, preset=preset_name)
    with torch.device(device):
        model = UseModel(config, clip, dino)
    return model.to(device).eval()


def fixed_masks(n: int, height: int, width: int, seed: int = 0) -> list[Segment]:
    """``n`` masks of varied size and shape (ellipses and boxes from 0.2% to 30% of the image)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    out = []
    for i in range(n):
        area = np.exp(rng.uniform(np.log(0.002), np.log(0.3))) * height * width
        aspect = np.exp(rng.uniform(-1, 1))
        h, w = np.sqrt(area / aspect), np.sqrt(area * aspect)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        if i % 2:
            mask = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
        else:
            mask = (np.abs(yy - cy) <= h / 2) & (np.abs(xx - cx) <= w / 2)
        if not mask.any():
            mask[int(min(cy, height - 1)), int(min(cx, width - 1))] = True
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        out.append(Segment(mask=mask, bbox=bbox, area=int(mask.sum()), rle={}))
    return out


def timed(fn: Callable[[], object], iters: int, warmup: int, device: str) -> float:
    """Mean seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper", choices=["paper", "base", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--masks", type=int, default=100)
    ap.add_argument("--images", type=int, default=10, help="timed images per embedder")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--encoder-batch", type=int, default=16)
    ap.add_argument("--crop-batch", type=int, default=64)
    ap.add_argument("--skip-cropclip", action="store_true")
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()
    dev = args.device
    amp = dev.startswith("cuda")  # bf16 autocast on GPU, as UseEmbedder does

    model = random_use_model(args.preset, dev)
    cfg, bb = model.config, model.backbones
    side = cfg.grid * bb.clip_patch
    x = torch.rand(args.encoder_batch, 3, side, side, device=dev)

    @torch.inference_mode()
    def encode() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return model.trainable.patch_features(model.backbones(x))

    enc_s = timed(encode, max(1, args.images // 2), 1, dev)
    image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    segments = fixed_masks(args.masks, args.height, args.width)
    use = UseEmbedder(model, dev, name=f"random-{args.preset}")
    use_s = timed(lambda: use.embed_segments(image, segments), args.images, args.warmup, dev)
    result = {
        "bench": "use_vs_cropclip", "preset": args.preset, "device": dev,
        "device_name": torch.cuda.get_device_name(0) if dev.startswith("cuda") else platform.processor() or platform.machine(),
        "torch": torch.__version__, "bf16_autocast": amp, "grid": cfg.grid,
        "clip_input": cfg.grid * bb.clip_patch, "dinov2_input": cfg.grid * bb.dino_patch,
        "clip_arch": cfg.clip_arch, "dinov2_arch": cfg.dinov2_arch, "dinov2_blocks": cfg.dinov2_blocks,
        "image": [args.height, args.width], "masks": args.masks, "encoder_batch": args.encoder_batch,
        "use_encoder_images_per_s": args.encoder_batch / enc_s,
        "use_s_per_image": use_s,
    }
    if not args.skip_cropclip:
        crop = CropClipEmbedder(model.clip, dev, batch=args.crop_batch)

        def crop_embed() -> np.ndarray:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                return crop.embed_segments(image, segments)

        crop_s = timed(crop_embed, max(1, args.images // 2), 1, dev)
        result.update(cropclip_s_per_image=crop_s, cropclip_input=model.clip.image_size, use_speedup=crop_s / use_s)

    print(f"{args.preset} on {result['device_name']} ({dev}, bf16 autocast: {amp})")
    print(f"  USE encoder ({cfg.clip_arch} @ {result['clip_input']} + {cfg.dinov2_arch} @ {result['dinov2_input']}, "
          f"batch {args.encoder_batch}): {result['use_encoder_images_per_s']:.3g} images/s")
    print(f"  USE, {args.masks} masks on a {args.width}x{args.height} image: {use_s * 1000:.1f} ms/image")
    if "cropclip_s_per_image" in result:
        print(f"  crop-CLIP, same masks ({model.clip.image_size} px crops, batch {args.crop_batch}): "
              f"{result['cropclip_s_per_image'] * 1000:.1f} ms/image  ->  USE is {result['use_speedup']:.1f}x cheaper")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
