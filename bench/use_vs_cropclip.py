"""USE vs crop-CLIP: seconds per image on the same photo with the same fixed masks, the embedders run in
turns (A B A B ...), the ratio with its spread, and multiply-adds (MACs) and MACs per second of each part.

    python bench/use_vs_cropclip.py --preset base --device cpu --iters 3 --stages
    python bench/use_vs_cropclip.py --preset base --device cpu --iters 3 --stages --before /work/base
    python bench/use_vs_cropclip.py --preset paper --device cuda --iters 10 --stages

Random weights in the preset's real architectures (the FLOPs of the real models; no checkpoint is
needed). Both embedders are called as the indexer calls them: ``UseEmbedder.embed_segments`` (one
encoder pass, all masks pooled) and ``CropClipEmbedder.embed_segments`` (one CLIP pass per mask, in
batches of ``--crop-batch``), on one real photo (longest side ``--side``) and ``--masks`` fixed masks.
Arms, all run once per turn, in turn:
  use             UseEmbedder.embed_segments, one image
  use (before)    (``--before DIR``) the same with the code of another checkout, e.g. the base commit
  use-batch       UseEmbedder.embed_batch over ``--batch-images`` copies, time per image
  crop-clip       CropClipEmbedder.embed_segments as users run it (no autocast of its own)
  crop-clip-bf16  (CUDA only) the same under bf16 autocast, as USE runs
  crop-clip-sdpa  (``--crop-sdpa``) crop-CLIP with nn.MultiheadAttention's fast path off (SDPA attention)
Ratios are taken per turn (crop-CLIP / USE, and USE before / after), then median, min and max.
``--before DIR`` imports that checkout's ``use_search.model.use`` in this process next to this one
(``benchlib.import_checkout``); both USE models share the same backbone objects and the same
trainable weights, and the bench checks that they embed alike. ``--stages`` adds USE's split (input
prep, CLIP tower, DINOv2 tower, merge + pool + head) with MACs and MAC/s, for each code version,
the stages interleaved too. Prints tables and one JSON line (``--json FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    count_gmacs, fixed_masks, import_checkout, interleaved, machine, photos, print_table, random_backbones,
    spread, write_json,
)

import use_search  # noqa: E402
from use_search.model.crop_clip import CropClipEmbedder  # noqa: E402
from use_search.model.geometry import letterbox  # noqa: E402
from use_search.model.backbones import BackboneFeatures  # noqa: E402
from use_search.model.use import DEFAULT_GRID, UseEmbedder, UseModel, describe_backbones  # noqa: E402
from use_search.presets import get_preset  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base", choices=["paper", "base", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--masks", type=int, default=100)
    ap.add_argument("--side", type=int, default=1024, help="longest side of the photo (the VOC photo: 1024 × 768)")
    ap.add_argument("--iters", type=int, default=3, help="timed turns (every arm once per turn)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed turns first")
    ap.add_argument("--batch-images", type=int, default=4, help="images per embed_batch call in the use-batch arm; 0: no such arm")
    ap.add_argument("--crop-batch", type=int, default=64, help="crops per CLIP forward (the settings' embed_batch)")
    ap.add_argument("--crop-sdpa", action="store_true", help="add crop-CLIP with nn.MultiheadAttention's fast path off")
    ap.add_argument("--stages", action="store_true", help="also time USE's stages (prep, CLIP, DINOv2, head)")
    ap.add_argument("--before", type=Path, help="another checkout (e.g. the base commit) to compare USE with, in this process")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--json", help="also write the JSON result here")
    return ap.parse_args()


def use_stages(model: Any, use: Any, image: np.ndarray, segments: list, dev: str) -> dict[str, Any]:
    """USE's embed_segments cut into its stages (the same calls, one after the other)."""
    bb, tr, grid = model.backbones, model.trainable, model.config.grid
    state: dict[str, Any] = {}

    def amp() -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.startswith("cuda"))

    @torch.inference_mode()
    def prep() -> None:
        state["weights"] = use.patch_weights(image.shape[:2], segments)[None]
        state["clip_x"], state["dino_x"] = bb.tower_inputs(letterbox(image, grid, model.clip.mean, dev)[None])

    @torch.inference_mode()
    def clip_tower() -> None:
        with amp():
            state["clip"] = bb.clip_forward(state["clip_x"])

    @torch.inference_mode()
    def dino_tower() -> None:
        with amp():
            state["dino"] = bb.dino_forward(state["dino_x"])

    @torch.inference_mode()
    def head() -> None:
        with amp():
            tr(BackboneFeatures(*state["clip"], *state["dino"]), state["weights"])

    prep(), clip_tower(), dino_tower()
    return {"prep (weights, letterbox, resize)": prep, "CLIP tower": clip_tower, "DINOv2 tower": dino_tower,
            "merge + pool + head": head}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    preset = get_preset(args.preset)
    grid = DEFAULT_GRID[args.preset]

    clip, dino = random_backbones(args.preset, grid, dev)
    config = describe_backbones(clip, dino, grid=grid, dinov2_blocks=preset.dinov2_blocks, preset=args.preset)
    with torch.device(dev):
        model = UseModel(config, clip, dino).to(dev).eval()
    versions: dict[str, tuple[Any, Any]] = {"use": (model, UseEmbedder(model, dev, name=f"random-{args.preset}"))}
    code = {"use": str(Path(use_search.__file__).resolve().parent)}
    if args.before:
        old = import_checkout(args.before, "before_use_search", ["use_search.model.use"])["use_search.model.use"]
        old_config = old.describe_backbones(clip, dino, grid=grid, dinov2_blocks=preset.dinov2_blocks, preset=args.preset)
        with torch.device(dev):
            old_model = old.UseModel(old_config, clip, dino).to(dev).eval()  # the same backbone objects
        old_model.trainable.load_state_dict(model.trainable.state_dict())  # and the same trainable weights
        versions["use (before)"] = (old_model, old.UseEmbedder(old_model, dev, name=f"random-{args.preset}"))
        code["use (before)"] = str(Path(old.__file__).resolve().parent.parent)

    image = photos(args.side)[0]
    h, w = image.shape[:2]
    segments = fixed_masks(args.masks, h, w)
    crop = CropClipEmbedder(clip, dev, batch=args.crop_batch)

    arms: dict[str, Any] = {name: (lambda e=emb: e.embed_segments(image, segments)) for name, (_, emb) in versions.items()}
    if args.batch_images > 1:
        use = versions["use"][1]
        use.batch = args.batch_images
        batch_images, batch_segments = [image] * args.batch_images, [segments] * args.batch_images
        arms["use-batch"] = lambda: use.embed_batch(batch_images, batch_segments)
    arms["crop-clip"] = lambda: crop.embed_segments(image, segments)
    if dev.startswith("cuda"):
        def crop_bf16() -> np.ndarray:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return crop.embed_segments(image, segments)
        arms["crop-clip-bf16"] = crop_bf16
    if args.crop_sdpa:
        def crop_sdpa() -> np.ndarray:
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                return crop.embed_segments(image, segments)
            finally:
                torch.backends.mha.set_fastpath_enabled(True)
        arms["crop-clip-sdpa"] = crop_sdpa

    agreement = None
    if args.before:
        a, b = (np.asarray(arms[name]()) for name in ("use", "use (before)"))
        agreement = float(np.abs(a - b).max())
    # MACs: USE on the whole call; crop-CLIP on one crop through the tower, times the masks.
    gmac = {name: count_gmacs(arms[name]) for name in versions}
    one_crop = crop.crops(image, segments[:1])
    crop_gmac = count_gmacs(lambda: clip.model.encode_image(one_crop)) * args.masks

    seconds = interleaved(arms, args.iters, args.warmup, dev)
    if "use-batch" in seconds:
        seconds["use-batch"] = [t / args.batch_images for t in seconds["use-batch"]]
    ratios = {}
    for num in [n for n in seconds if n.startswith("crop-clip")]:
        for den in [n for n in seconds if n.startswith("use")]:
            if num == "crop-clip" or den == "use":
                ratios[f"{num} / {den}"] = spread([c / u for c, u in zip(seconds[num], seconds[den])])
    if args.before:
        ratios["use (before) / use"] = spread([b / a for b, a in zip(seconds["use (before)"], seconds["use"])])

    stages: dict[str, Any] = {}
    if args.stages:
        fns = {(name, stage): fn for name, (m, e) in versions.items() for stage, fn in use_stages(m, e, image, segments, dev).items()}
        stage_gmac = {key: count_gmacs(fn) for key, fn in fns.items()}
        stage_s = interleaved({f"{n}|{s}": fn for (n, s), fn in fns.items()}, args.iters, 0, dev)
        for (name, stage) in fns:
            t = float(np.median(stage_s[f"{name}|{stage}"]))
            g = stage_gmac[(name, stage)]
            stages.setdefault(name, {})[stage] = {"ms": 1000 * t, "gmac": g, "gmac_per_s": g / t if g else None}

    crop_s = float(np.median(seconds["crop-clip"]))
    result = {
        "bench": "use_vs_cropclip", "code": code, "preset": args.preset, "device": dev,
        "threads": torch.get_num_threads(), "grid": grid, "clip_arch": config.clip_arch,
        "clip_input": grid * model.backbones.clip_patch, "dinov2_arch": config.dinov2_arch,
        "dinov2_input": grid * model.backbones.dino_patch, "dinov2_blocks": config.dinov2_blocks,
        "crop_input": clip.image_size, "crop_batch": args.crop_batch, "image": [h, w], "masks": args.masks,
        "batch_images": args.batch_images, "iters": args.iters, "before_after_max_abs_diff": agreement,
        "seconds": seconds, "ratios": ratios, "use_gmac": gmac, "cropclip_gmac": crop_gmac,
        "flop_ratio": {name: crop_gmac / g for name, g in gmac.items()},
        "gmac_per_s": {**{name: gmac[name] / float(np.median(seconds[name])) for name in versions}, "crop-clip": crop_gmac / crop_s},
        "stages": stages, "machine": machine(),
    }
    report(result)
    write_json(args.json, result)


def report(r: dict[str, Any]) -> None:
    print(f"\npreset {r['preset']} on {r['device']}, {r['threads']} threads; USE = {r['clip_arch']} @ {r['clip_input']} + "
          f"{r['dinov2_arch']} @ {r['dinov2_input']} (last {r['dinov2_blocks']} blocks); crop-CLIP = {r['masks']} × "
          f"{r['crop_input']} px crops, batch {r['crop_batch']}; photo {r['image'][1]}×{r['image'][0]}, {r['masks']} masks")
    for name, root in r["code"].items():
        print(f"  {name}: {root}")
    if r["before_after_max_abs_diff"] is not None:
        print(f"  before vs this checkout, same weights: embeddings differ by at most {r['before_after_max_abs_diff']:.2g}")
    print_table("seconds per image, median over turns", [
        {"arm": name, "s/image": float(np.median(t)), "min": min(t), "max": max(t), "turns": len(t)}
        for name, t in r["seconds"].items()
    ])
    print_table("ratios per turn", [{"ratio": k, **v} for k, v in r["ratios"].items()])
    print_table("multiply-adds per image", [
        {"USE code": name, "USE GMAC": g, "crop-CLIP GMAC": r["cropclip_gmac"], "FLOP ratio": r["flop_ratio"][name],
         "measured ratio": r["ratios"][f"crop-clip / {name}"]["median"],
         "measured / FLOP ratio": r["ratios"][f"crop-clip / {name}"]["median"] / r["flop_ratio"][name],
         "USE GMAC/s": r["gmac_per_s"][name], "crop-CLIP GMAC/s": r["gmac_per_s"]["crop-clip"]}
        for name, g in r["use_gmac"].items()
    ])
    for name, st in r["stages"].items():
        print_table(f"stages of {name} (embed_segments, one image; median ms over turns)", [{"stage": k, **v} for k, v in st.items()])


if __name__ == "__main__":
    main()
