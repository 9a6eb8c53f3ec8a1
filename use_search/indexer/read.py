"""Read stage: find image files under a folder, read and decode them (``imaging.decode_work``) to upright
RGB at the working size, with a reason on failure."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from use_search.imaging import ImageReadError, decode_work
from use_search.types import ImageRecord

__all__ = ["ImageReadError"]  # raised here, defined with the decoders


@dataclass
class LoadedImage:
    record: ImageRecord
    pixels: np.ndarray  # H×W×3 uint8 RGB, upright, at the working size (the record has the original's size)
    warnings: list[str] = field(default_factory=list)  # what the decoder warned about (corrupt EXIF...)


def find_images(
    root: Path, extensions: Sequence[str], on_error: Callable[[Path, str], None] | None = None
) -> Iterator[Path]:
    """Image files under ``root`` (or ``root`` itself), recursively, by extension, in sorted order.

    Folder symlinks are not followed (no loops, no escaping the tree); file symlinks are kept under
    the name they are found by, so their points carry a path that exists in the indexed folder.
    A folder that cannot be listed is passed to ``on_error`` (folder, reason) and skipped.
    """
    exts = {e.lower() for e in extensions}
    root = Path(root).absolute()
    if not root.is_dir():
        if not root.exists():
            raise FileNotFoundError(f"no such folder: {root}")
        yield root  # one file (the read stage refuses it if it is not a regular file)
        return

    def onerror(e: OSError) -> None:
        if on_error is not None:
            on_error(Path(e.filename or root), f"cannot list folder: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in exts:
                yield Path(dirpath) / name


def count_images(root: Path, extensions: Sequence[str]) -> int:
    """How many paths ``find_images`` yields (a walk without keeping them: the list can be huge)."""
    return sum(1 for _ in find_images(root, extensions))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder",
}


def _not_regular(mode: int) -> str:
    return f"not a regular file: it is {_FILE_KINDS.get(stat.S_IFMT(mode), 'a special file')}"


def check_name(path: Path) -> None:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        # Payloads are JSON: a name that is not UTF-8 (undecodable bytes on disk) cannot be stored.
        raise ImageReadError("file name is not valid UTF-8; rename the file to index it") from None


def stat_file(path: Path) -> os.stat_result:
    """``stat`` (following a file symlink) of a file that may be read: a regular file with a valid name."""
    check_name(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageReadError(f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(_not_regular(st.st_mode))
    return st


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image within ``max_pixels`` can be: uncompressed 16-bit RGBA (8 bytes a
    pixel) plus 16 MiB of metadata. A bigger file (a video or disk image under an image name) is refused
    before it is read: four decode threads reading 5 GB each would kill the run, and every rerun."""
    return max_pixels * 8 + (16 << 20)


def read_file(path: Path, max_bytes: int | None = None) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file and its ``stat``. Anything else (a FIFO would block ``read`` forever,
    a device never ends) is refused from the open descriptor, so a swap after ``stat_file`` is caught too;
    so is a file over ``max_bytes`` (``max_file_bytes``), also when it grows while it is read."""
    check_name(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ImageReadError(f"cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageReadError(_not_regular(st.st_mode))
        too_big = ImageReadError(
            f"file is {st.st_size / 2**20:,.0f} MiB, larger than any image within the pixel limit can be "
            "(max_image_pixels × 8 bytes + 16 MiB)"
        )
        if max_bytes is not None and st.st_size > max_bytes:
            raise too_big
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise too_big
    except OSError as e:
        raise ImageReadError(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return data, st


# Decoder warnings -----------------------------------------------------------------------------------
# Pillow reports recoverable damage (corrupt EXIF, truncated metadata...) with ``warnings.warn``, which
# prints to stderr without the file name. While ``route_warnings`` is active, a thread inside
# ``collect_warnings`` gets them in a list instead, and the indexer puts them in that file's report.
# ``warnings.catch_warnings`` is not thread-safe, so the global hook is installed once per run by the
# thread that starts it, and the decode threads only set a thread-local list.
_tls = threading.local()


@contextmanager
def route_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        # "always": the default action shows a message once per code location, so a second file with
        # the same damage would get no report.
        warnings.filterwarnings("always", module=r"PIL(\.|$)")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            bucket = getattr(_tls, "bucket", None)
            if bucket is None:
                shown(message, category, filename, lineno, file, line)
            else:
                bucket.append(str(message).strip())

        warnings.showwarning = show
        yield


@contextmanager
def collect_warnings() -> Iterator[list[str]]:
    bucket: list[str] = []
    before = getattr(_tls, "bucket", None)
    _tls.bucket = bucket
    try:
        yield bucket
    finally:
        _tls.bucket = before


def load_image(
    path: Path, data: bytes, max_pixels: int, sha256: str | None = None, side: int | None = None
) -> LoadedImage:
    """Decode a file's bytes at the working size ``side`` (``imaging.decode_work``; None: full size); the
    record keeps the original's upright size. The decoder's warnings go to ``LoadedImage.warnings``
    (see ``route_warnings``)."""
    with collect_warnings() as seen:
        img = decode_work(data, max_pixels, side)
    return LoadedImage(ImageRecord(str(path), sha256 or sha256_bytes(data), img.width, img.height), img.pixels, seen)


def read_image(path: Path, max_pixels: int, side: int | None = None) -> LoadedImage:
    data, _ = read_file(path, max_file_bytes(max_pixels))
    return load_image(path, data, max_pixels, side=side)
