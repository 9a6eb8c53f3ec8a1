import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from use_search.imaging import decode_work
from use_search.indexer.read import (
    ImageReadError, find_images, max_file_bytes, read_file, read_image, route_warnings, stat_file,
)


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_reads_real_photo_with_hash(photos):
    loaded = read_image(photos["voc"], 10**8)
    assert loaded.pixels.dtype == np.uint8 and loaded.pixels.shape == (loaded.record.height, loaded.record.width, 3)
    assert len(loaded.record.sha256) == 64 and loaded.record.path == str(photos["voc"])


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty file"), (b"hello, I am text", "not an image"), ],
)
def test_bad_bytes_have_reasons(data, reason):
    with pytest.raises(ImageReadError, match=reason):
        decode_work(data, 10**8, None).pixels


def test_truncated_jpeg_is_rejected(voc):
    data = _bytes(Image.fromarray(voc["rgb"]), "JPEG")
    with pytest.raises(ImageReadError, match="cannot decode"):
        decode_work(data[: len(data) // 2], 10**8, None).pixels


def test_pixel_limit_guards_against_bombs():
    data = _bytes(Image.new("L", (4000, 4000)), "PNG")
    with pytest.raises(ImageReadError, match="over the 1,000,000-pixel limit"):
        decode_work(data, 1_000_000, None).pixels


def test_files_and_uploads_accept_the_same_formats(tmp_path, voc):
    """One format list: a file the indexer reads is one the API takes, and the refusal is the same."""
    from use_search.imaging import FORMATS, PixelBudgetError, probe

    path = tmp_path / "icon.png"  # an icon under an image name
    path.write_bytes(_bytes(Image.fromarray(voc["rgb"]).resize((32, 32)), "ICO"))
    with pytest.raises(ImageReadError, match="unsupported image format ICO; accepted: JPEG, PNG") as e:
        read_image(path, 10**8)
    with pytest.raises(ImageReadError, match=str(e.value)):
        probe(path.read_bytes(), 10**8)
    assert "ICO" not in FORMATS
    with pytest.raises(PixelBudgetError):  # the pixel limit is the API's 413 error, for files too
        read_image(_write(tmp_path / "big.png", _bytes(Image.new("L", (2000, 1000)), "PNG")), 1_000_000)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_exif_rotation_gives_the_upright_image(voc):
    rgb = voc["rgb"]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90° clockwise
    data = _bytes(Image.fromarray(rgb), "PNG", exif=exif)
    out = decode_work(data, 10**8, None).pixels
    assert out.shape == (rgb.shape[1], rgb.shape[0], 3)
    assert np.array_equal(out, np.rot90(rgb, k=-1))


def test_modes_become_rgb(voc):
    grey16 = Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16))
    out = decode_work(_bytes(grey16, "PNG"), 10**8, None).pixels
    assert out.shape == (64, 64, 3) and out.max() > 200  # scaled, not clipped to 255 everywhere
    assert len(np.unique(out[..., 0])) > 100
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert (decode_work(_bytes(rgba, "PNG"), 10**8, None).pixels == 255).all()  # transparent → white
    cmyk = Image.fromarray(voc["rgb"]).convert("CMYK")
    assert decode_work(_bytes(cmyk, "JPEG"), 10**8, None).pixels.shape == voc["rgb"].shape


def test_find_images_recursive_by_extension_and_no_dir_symlink_loops(tmp_path, photos):
    root = photos["voc"].parent
    (root / "notes.txt").write_text("x")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    found = list(find_images(root, (".jpg", ".png")))
    assert [p.name for p in found] == ["voc.jpg", "astronaut.png", "chelsea.png", "coffee.png"]


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "b.jpg"
    os.mkfifo(fifo)  # read_bytes() on it would block forever
    with pytest.raises(ImageReadError, match="not a regular file: it is a FIFO"):
        stat_file(fifo)
    with pytest.raises(ImageReadError, match="not a regular file: it is a FIFO"):
        read_file(fifo)
    with pytest.raises(ImageReadError, match="not a regular file: it is a character device"):
        read_file(Path("/dev/zero"))  # would never end
    (tmp_path / "link.jpg").symlink_to("/dev/zero")
    with pytest.raises(ImageReadError, match="character device"):
        read_image(tmp_path / "link.jpg", 10**8)


def test_files_too_big_for_any_image_are_not_read(tmp_path, photos):
    """A 6 GiB file under an image name (a video, a disk image) was read whole into memory, in each of
    the indexer's four decode threads: the run died, and every rerun at the same file. Refused from its
    size (a sparse file here: nothing is written or read)."""
    limit = max_file_bytes(50_000_000)
    assert limit == 50_000_000 * 8 + (16 << 20)
    huge = tmp_path / "movie.jpg"
    with open(huge, "wb") as f:
        f.truncate(6 << 30)
    with pytest.raises(ImageReadError, match="file is 6,144 MiB, larger than any image within the pixel limit"):
        read_file(huge, limit)
    with pytest.raises(ImageReadError, match="larger than any image"):
        read_image(huge, 50_000_000)
    voc = photos["voc"]
    data, st = read_file(voc, os.path.getsize(voc))  # exactly at the limit: read
    assert len(data) == st.st_size
    with pytest.raises(ImageReadError, match="larger than any image"):
        read_file(voc, os.path.getsize(voc) - 1)


def test_decoder_warnings_are_collected_per_file_while_routed(voc, tmp_path):
    from test_reliability import corrupt_exif_jpeg

    data = corrupt_exif_jpeg(voc["rgb"][:64, :64].copy())
    path = tmp_path / "c.jpg"
    path.write_bytes(data)
    with route_warnings():
        first = read_image(path, 10**8)
        second = read_image(path, 10**8)  # the same warning again: reported again, for this file too
    assert first.pixels.shape == (64, 64, 3)
    assert first.warnings == second.warnings == ["Corrupt EXIF data.  Expecting to read 12 bytes but only got 5."]
    # Outside a run nothing is swallowed: the warning goes where Python sends warnings.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert read_image(path, 10**8).warnings == []
    assert any("Corrupt EXIF" in str(w.message) for w in seen)


def test_find_images_reports_folders_it_cannot_list(tmp_path, photos, monkeypatch):
    root = photos["voc"].parent
    errors = []
    real_scandir = os.scandir

    def scandir(path):  # an unreadable folder, as os.walk sees it (root bypasses chmod here)
        if str(path).endswith("/sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = list(find_images(root, (".jpg", ".png"), on_error=lambda folder, reason: errors.append((folder, reason))))
    assert [p.name for p in found] == ["voc.jpg"]
    assert errors == [(root / "sub", "cannot list folder: Permission denied")]
