"""Shared pieces of the eval commands: class lists, label files, timing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from use_search.indexer.read import find_images


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


Progress = Callable[[int, int, str], None]  # (done, total, image name)


def read_class_list(path: Path) -> list[str]:
    """One class name per line; blank lines and lines starting with ``#`` are skipped.

    A line ``3: wall`` or ``3 wall``-style index prefix is *not* parsed: line order is the label index
    (line 1 → label 0), which is how ADE-150 / PC-59 class files are usually written."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"class list not found: {path} (a text file, one class name per line)")
    names = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            names.append(s)
    if not names:
        raise ValueError(f"class list {path} is empty")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class list {path} repeats names: {', '.join(dup[:5])}")
    return names


def read_label_map(path: Path) -> np.ndarray:
    """A label image → (H, W) int64 of its raw values (8-bit L/P PNG, 16-bit PNG or TIFF)."""
    with Image.open(path) as img:
        if img.mode in ("RGB", "RGBA"):
            raise ValueError(
                f"{path}: label images must hold class indices (mode L, P, I;16 or I), not colours ({img.mode})"
            )
        return np.asarray(img).astype(np.int64)


def find_files(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    return sorted(find_images(folder, extensions))


@dataclass
class Timer:
    """Seconds spent per stage, summed over images."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - start
        return now


def nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)
