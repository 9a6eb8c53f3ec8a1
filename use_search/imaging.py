"""Images at the segmenter's working size, and masks mapped back to the original geometry.

SAM's encoder sees at most its input size (1024 px long side for the real models) whatever the
image; what made a 7000×7000 image cost minutes was everything around it at full size: the decoded
RGB array and every candidate mask upscaled to 7000×7000 before NMS. Every path that segments (the
indexer, Ray's actors, the API, eval) decodes with ``decode_work`` straight to the working size
(``working_side``), JPEGs with DCT scaling where that stays close to the full decode.
Masks that are stored are mapped back to the original geometry afterwards, one kept mask at a time
and without building the big mask (``upscale_rle``).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from pycocotools import mask as mask_utils

from use_search.types import Segment, Segmenter

# SAM's ResizeLongestSide resizes with PIL's bilinear filter to this shape; the same here makes its own
# resize of our output a no-op copy.
RESAMPLE = Image.Resampling.BILINEAR
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# The accepted formats, for files and uploads alike (MPO: a camera's multi-picture JPEG, its first frame).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "MPO")
# A JPEG is DCT-scaled (1/2, 1/4, 1/8) only down to this many times the working size: the bilinear
# resize from there is close to the resize of the full decode (about a tenth of a grey level on average
# for a photo; a JPEG under this many times the working size is decoded in full, exactly as before).
DRAFT_MARGIN = 2
# Pillow refuses a PNG metadata chunk over 1 MB after decompression ("text chunk"), and a PNG's
# colour profile is such a chunk: cameras and editors embed profiles of several MB, which a JPEG
# carries without limit. 16 MB per chunk; all of an image's text stays under MAX_TEXT_MEMORY (64 MB).
PngImagePlugin.MAX_TEXT_CHUNK = 16 << 20


class ImageReadError(Exception):
    """A file that is not a usable image; the message is the reason shown to the user."""


def to_rgb(img: Image.Image) -> Image.Image:
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


def work_shape(height: int, width: int, side: int | None) -> tuple[int, int]:
    """(h, w) with the long side at most ``side`` (None: no limit): segment-anything's
    ``get_preprocess_shape`` rounding, at least one pixel per side."""
    if side is None or max(height, width) <= side:
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
        raise ImageReadError(f"unsupported image format {img.format}; accepted: {', '.join(FORMATS[:-1])}")
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


def working_side(segmenter: Segmenter, configured: int | None) -> int | None:
    """The long side images are segmented and embedded at: ``configured`` (setting ``work_side``; 0
    means full resolution), else the segmenter's input size. None: full resolution."""
    if configured is not None:
        return configured or None
    return segmenter.input_size


def to_original(segments: Sequence[Segment], height: int, width: int) -> list[Segment]:
    """Segments found at the working size with their stored geometry (RLE, box, area) mapped to the
    original ``height``×``width``; ``mask`` stays at the working size (the embedders' input)."""
    from use_search.masks import rle_area, rle_bbox  # scipy: not on the query path, which reads images

    out = []
    for s in segments:
        if s.mask.shape == (height, width):
            out.append(s)
            continue
        rle = upscale_rle(s.mask, height, width)
        out.append(dataclasses.replace(s, rle=rle, bbox=rle_bbox(rle), area=rle_area(rle)))
    return out


def decode_work(data: bytes, max_pixels: int, side: int | None) -> WorkImage:
    """Bytes of an accepted image (``FORMATS``; the first frame of an animation) → upright RGB with
    the long side at most ``side`` (None: full size), plus the original's upright size. The one decoder
    of every path that reads images.

    The pixels are those of the full image decoded, made RGB (``to_rgb``) and resized with ``RESAMPLE``
    (SAM's own resize), except for a JPEG ``DRAFT_MARGIN`` times over the working size (DCT-scaled).
    ``ImageReadError`` (``PixelBudgetError`` past ``max_pixels``) for anything that is not a usable image.
    """
    img, info = _open(data, max_pixels, late_exif=True)
    th, tw = work_shape(info.height, info.width, side)
    # No warnings.catch_warnings here: it is not thread-safe, and the indexer decodes in threads.
    # ``max_pixels`` is the guard; Pillow's own bomb check (``DecompressionBombError``) stays an error.
    try:
        if img.format == "JPEG" and (th, tw) != (info.height, info.width):
            raw_w, raw_h = img.size
            f = DRAFT_MARGIN * tw / info.width
            img.draft("RGB", (max(1, int(raw_w * f)), max(1, int(raw_h * f))))
        img.load()
        img = ImageOps.exif_transpose(img) or img
        if (img.height, img.width) != (th, tw):
            if img.mode == "1":
                img = img.convert("L")  # a third of the RGB array at full size, the same resize
            elif img.mode not in ("L", "RGB"):
                img = to_rgb(img)  # transparency, palette, 16-bit, CMYK: made RGB first, as at full size
            img = img.resize((tw, th), RESAMPLE)
        rgb = to_rgb(img)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
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
