"""Uploads at the segmenter's working size, and masks mapped back to the original geometry.

SAM's encoder sees at most its input size (1024 px long side for the real models) whatever the
upload; what made a 7000×7000 upload cost minutes was everything around it at full size: the decoded
RGB array and every candidate mask upscaled to 7000×7000 before NMS. The API decodes an upload
straight to the working size (JPEG's DCT scaling where it can) and runs segmentation and embedding
there. Masks that are stored are mapped back to the original geometry afterwards, one kept mask at a
time and without building the big mask (``upscale_rle``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from use_search.indexer.read import ImageReadError, _to_rgb

# SAM's ResizeLongestSide resizes with PIL's bilinear filter to this shape; the same here makes its own
# resize of our output a no-op copy.
RESAMPLE = Image.Resampling.BILINEAR
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "MPO")


@dataclass(frozen=True)
class Probe:
    format: str
    width: int  # upright (EXIF orientation applied)
    height: int


@dataclass
class WorkImage:
    pixels: np.ndarray  # H×W×3 uint8 RGB, upright, long side at most the working side
    width: int  # the original's upright size
    height: int

    @property
    def scaled(self) -> bool:
        return self.pixels.shape[:2] != (self.height, self.width)


class PixelBudgetError(ImageReadError):
    """The image has more pixels than a request may decode."""


def work_shape(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) with the long side at most ``side``: segment-anything's ``get_preprocess_shape`` rounding,
    at least one pixel per side."""
    if max(height, width) <= side:
        return height, width
    scale = side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _orientation(img: Image.Image, late_exif: bool) -> int:
    """The EXIF orientation (1 when unreadable: a corrupt EXIF block must not hide the image).

    A PNG's eXIf chunk may follow the pixel data, and Pillow's ``PngImageFile.getexif`` decodes the
    whole image to look for it: only where the image is decoded anyway (``late_exif``). A header probe
    reads the metadata before the pixels (``Image.getexif``), so it never decodes a 7000×7000 PNG."""
    try:
        exif = img.getexif() if late_exif or img.format != "PNG" else Image.Image.getexif(img)
        return int(exif.get(ExifTags.Base.Orientation, 1))
    except Exception:
        return 1


def _open(data: bytes, max_pixels: int, late_exif: bool = False) -> tuple[Image.Image, Probe]:
    if not data:
        raise ImageReadError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageReadError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot decode: {e}") from None
    if img.format not in FORMATS:
        raise ImageReadError(f"unsupported image format {img.format}; send one of {', '.join(FORMATS[:-1])}")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageReadError("image has no pixels")
    if w * h > max_pixels:
        raise PixelBudgetError(f"image is {w}×{h} = {w * h:,} pixels, over the {max_pixels:,}-pixel limit")
    if _orientation(img, late_exif) in TRANSPOSED:
        w, h = h, w
    return img, Probe(img.format, w, h)


def probe(data: bytes, max_pixels: int) -> Probe:
    """Format and upright size from the header alone (nothing decoded): cheap checks before any work.
    An orientation given only after a PNG's pixels is not seen here (``decode_work`` sees it)."""
    return _open(data, max_pixels)[1]


def decode_work(data: bytes, max_pixels: int, side: int) -> WorkImage:
    """Bytes → upright RGB with the long side at most ``side``, plus the original's upright size.

    ``ImageReadError`` (``PixelBudgetError`` past ``max_pixels``) for anything that is not a usable image.
    """
    img, info = _open(data, max_pixels, late_exif=True)
    th, tw = work_shape(info.height, info.width, side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if img.format == "JPEG" and (th, tw) != (info.height, info.width):
                # Decode at 1/2, 1/4 or 1/8 scale, never below the target size.
                raw_w, raw_h = img.size
                f = tw / info.width
                img.draft("RGB", (max(1, int(raw_w * f)), max(1, int(raw_h * f))))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            if (img.height, img.width) != (th, tw):
                if img.mode == "1":
                    img = img.convert("L")  # a third of the RGB array at full size
                elif img.mode not in ("L", "RGB", "RGBA", "LA"):
                    img = _to_rgb(img)  # palette, 16-bit, CMYK...: resize an 8-bit mode
                img = img.resize((tw, th), RESAMPLE)
            rgb = _to_rgb(img)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"decompression bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"cannot decode: {e}") from None
    return WorkImage(np.array(rgb, dtype=np.uint8), info.width, info.height)


def nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Nearest-neighbour source index of each of ``n_out`` pixels sampled from ``n_in`` (pixel centres)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask (the reference for ``upscale_rle``; fine for small sizes)."""
    h, w = mask.shape
    return mask[nearest_index(height, h)][:, nearest_index(width, w)]


def upscale_rle(mask: np.ndarray, height: int, width: int) -> dict[str, Any]:
    """COCO RLE of ``resize_mask(mask, height, width)``, computed from ``mask``'s transitions only.

    RLE runs over the image column by column. Output column X repeats source column ``cols[X]`` with
    each source row stretched over a band of output rows, so its value changes exactly where the source
    column changes, at the first output row of that source row's band. The counts come from those
    positions; the big mask (49 M pixels for a 7000×7000 image) is never built.
    """
    h, w = mask.shape
    rows, cols = nearest_index(height, h), nearest_index(width, w)
    used, starts = np.unique(rows, return_index=True)  # source rows in use, first output row of each
    m = np.asarray(mask, dtype=bool)[used]  # (k, w)
    col, row = np.nonzero((m[1:] != m[:-1]).T)  # transitions per source column, ordered by column
    at = starts[1:][row]  # output row where each transition lands
    per_col = np.bincount(col, minlength=w)
    first_of = np.concatenate([[0], np.cumsum(per_col)[:-1]])
    n = per_col[cols]  # transitions in each output column
    out_first = np.concatenate([[0], np.cumsum(n)[:-1]])
    take = np.repeat(first_of[cols] - out_first, n) + np.arange(int(n.sum()))
    inner = np.repeat(np.arange(width, dtype=np.int64) * height, n) + at[take]
    top, bottom = m[0, cols], m[-1, cols]
    between = (np.flatnonzero(top[1:] != bottom[:-1]) + 1).astype(np.int64) * height  # column seams
    changes = np.sort(np.concatenate([inner, between]))
    counts = np.diff(np.concatenate([[0], changes, [height * width]]))
    if top[0]:
        counts = np.concatenate([[0], counts])  # COCO RLE starts with a run of zeros
    rle = mask_utils.frPyObjects({"counts": counts.tolist(), "size": [height, width]}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
