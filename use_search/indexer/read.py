"""Read stage: find image files under a folder and decode them to upright RGB, with a reason on failure."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from use_search.types import ImageRecord


class ImageReadError(Exception):
    """A file that is not a usable image; the message is the reason shown to the user."""


@dataclass
class LoadedImage:
    record: ImageRecord
    pixels: np.ndarray  # H×W×3 uint8 RGB, EXIF orientation applied


def find_images(root: Path, extensions: Sequence[str]) -> Iterator[Path]:
    """Image files under ``root`` (or ``root`` itself), recursively, by extension, in sorted order.

    Folder symlinks are not followed (no loops, no escaping the tree); file symlinks are kept under
    the name they are found by, so their points carry a path that exists in the indexed folder.
    """
    exts = {e.lower() for e in extensions}
    root = Path(root).absolute()
    if root.is_file():
        yield root
        return
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in exts:
                yield Path(dirpath) / name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: PIL's convert("RGB") clips instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels over white, like a viewer shows them.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes → upright H×W×3 uint8 RGB. First frame of animations. ``ImageReadError`` on anything else."""
    if not data:
        raise ImageReadError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageReadError(f"image is {w}×{h} = {w * h:,} pixels, over the {max_pixels:,} limit")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"decompression bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"cannot decode: {e}") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ImageReadError("image has no pixels")
    return np.array(rgb, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays


def read_image(path: Path, max_pixels: int) -> LoadedImage:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        # Payloads are JSON: a name that is not UTF-8 (undecodable bytes on disk) cannot be stored.
        raise ImageReadError("file name is not valid UTF-8; rename the file to index it") from None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageReadError(f"cannot read: {e.strerror or e}") from None
    pixels = decode_image(data, max_pixels)
    h, w = pixels.shape[:2]
    return LoadedImage(ImageRecord(str(path), sha256_bytes(data), w, h), pixels)
