"""The API's working-size decode and the RLE upscaling of kept masks, against the reference paths
they replace: full decode + SAM's own resize, and building the full-size mask then encoding it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from use_search.imaging import RESAMPLE, PixelBudgetError, decode_work, probe, resize_mask, upscale_rle, work_shape
from use_search.indexer.read import ImageReadError
from use_search.masks import encode_rle, rle_area, rle_bbox


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_upscale_rle_matches_building_the_big_mask():
    rng = np.random.default_rng(0)
    for _ in range(400):
        h, w = rng.integers(1, 24, 2)
        big_h, big_w = rng.integers(1, 80, 2)  # also downscales and odd ratios
        mask = rng.random((h, w)) < rng.random()
        assert upscale_rle(mask, big_h, big_w) == encode_rle(resize_mask(mask, big_h, big_w)), (h, w, big_h, big_w)
    mask = np.zeros((256, 171), bool)
    mask[40:200, 30:150] = True
    mask[90:120, 60:70] = False
    rle = upscale_rle(mask, 3000, 2000)
    assert rle == encode_rle(resize_mask(mask, 3000, 2000))
    assert rle["size"] == [3000, 2000] and rle_area(rle) == int(resize_mask(mask, 3000, 2000).sum())
    x, y, w, h = rle_bbox(rle)
    assert abs(x - 30 * 2000 / 171) < 12 and abs(y - 40 * 3000 / 256) < 12 and w > 0 and h > 0


def test_work_shape_is_sams_and_never_empty():
    t = ResizeLongestSide(1024)
    for h, w in ((7000, 7000), (3000, 2000), (1000, 1), (1, 4000), (480, 640), (1024, 10)):
        exp = t.get_preprocess_shape(h, w, 1024) if max(h, w) > 1024 else (h, w)
        assert work_shape(h, w, 1024) == (max(1, exp[0]), max(1, exp[1]))
    assert work_shape(1, 4000, 1024) == (1, 1024)


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "P"])
def test_decode_work_equals_sams_resize_of_the_full_image(mode):
    img = Image.fromarray(skimage.data.astronaut()).resize((1500, 1100))
    img = img.convert(mode) if mode != "P" else img.quantize(64)
    data = encoded(img, "PNG")
    work = decode_work(data, 50_000_000, 256)
    full = decode_work(data, 50_000_000, None).pixels
    ref = ResizeLongestSide(256).apply_image(full)  # what SAM feeds its encoder from the full image
    assert (work.width, work.height) == (1500, 1100) and work.scaled
    assert work.pixels.shape == ref.shape == (188, 256, 3)
    assert np.abs(work.pixels.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "P", "PA", "RGBA", "LA", "I;16", "CMYK"])
def test_decode_at_the_working_size_is_the_resize_of_the_full_decode(mode):
    """The one decoder at a working size gives exactly what the indexer gave before it decoded straight
    to that size: the full image made RGB, then resized with SAM's filter (``RESAMPLE``)."""
    rgb = Image.fromarray(skimage.data.astronaut()).resize((700, 500))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    elif mode in ("P", "PA"):
        img = rgb.quantize(64)
        if mode == "PA":
            img.info["transparency"] = 3
    elif mode in ("RGBA", "LA"):
        img = rgb.convert(mode)
        img.putalpha(Image.linear_gradient("L").resize(img.size))
    else:
        img = rgb.convert(mode)
    for data in [encoded(img, "PNG" if mode != "CMYK" else "JPEG")] + ([encoded(img, "JPEG")] if mode in ("RGB", "L") else []):
        full = decode_work(data, 50_000_000, None)
        work = decode_work(data, 50_000_000, 256)  # a JPEG under DRAFT_MARGIN × 256 px: no DCT scaling
        want = np.asarray(Image.fromarray(full.pixels).resize((256, 183), RESAMPLE))
        assert (work.width, work.height) == (full.width, full.height) == (700, 500) and not full.scaled
        np.testing.assert_array_equal(work.pixels, want)


def test_decode_work_jpeg_draft_and_exif_orientation():
    img = Image.fromarray(skimage.data.chelsea()).resize((4000, 3000))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: upright it is 3000 wide, 4000 high
    data = encoded(img, "JPEG", quality=92, exif=exif.tobytes())
    assert (probe(data, 50_000_000).width, probe(data, 50_000_000).height) == (3000, 4000)
    full = Image.fromarray(decode_work(data, 50_000_000, None).pixels)
    work = decode_work(data, 50_000_000, 1024)  # 4000 px is under DRAFT_MARGIN × 1024: decoded in full
    assert (work.width, work.height) == (3000, 4000) and work.pixels.shape == (1024, 768, 3)
    np.testing.assert_array_equal(work.pixels, np.asarray(full.resize((768, 1024), RESAMPLE)))
    work = decode_work(data, 50_000_000, 256)  # DCT-scaled to 1/4 (1000 px), then the same resize
    assert (work.width, work.height) == (3000, 4000) and work.pixels.shape == (256, 192, 3)
    ref = np.asarray(full.resize((192, 256), RESAMPLE))
    assert np.abs(work.pixels.astype(float) - ref).mean() < 3
    small = encoded(Image.fromarray(skimage.data.coffee()), "PNG")
    assert not decode_work(small, 50_000_000, 1024).scaled


def test_decode_work_refusals():
    big = encoded(Image.new("1", (5000, 5000)), "PNG")
    with pytest.raises(PixelBudgetError, match="over the 20,000,000-pixel limit"):
        probe(big, 20_000_000)
    with pytest.raises(PixelBudgetError):
        decode_work(big, 20_000_000, 1024)
    for data, msg in ((b"", "empty"), (b"not an image", "not an image"), (big[:200], "cannot decode")):
        with pytest.raises(ImageReadError, match=msg):
            decode_work(data, 50_000_000, 1024)
    thin = decode_work(encoded(Image.new("RGB", (4000, 1), (9, 9, 9)), "PNG"), 50_000_000, 1024)
    assert thin.pixels.shape == (1, 1024, 3) and (thin.width, thin.height) == (4000, 1)
