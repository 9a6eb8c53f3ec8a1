"""The embedded store's files: the owner's lock, the shard folders, disk space (sparse engine files
that a memory-backed file system fills on load), and the private copy a read-only reader opens."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from use_search.store import layout as lay
from use_search.store.base import StoreError

LOCK_FILE = ".lock"
SEGMENTS_DIR = "segments"
IMAGES_DIR = "images"
EDGE_CONFIG_FILE = "edge_config.json"  # written by qdrant-edge into every shard folder
SNAPSHOT_FORMAT = "use-search-snapshot-1"
SNAPSHOT_MANIFEST = "use-search-snapshot.json"
MB = 1024 * 1024
# Measured (docs/benchmarks.md): creating a store and writing its first points fills ~14 MB on tmpfs,
# ~0.3 MB on ext4. Its engine files are sparse (~240 MB), and on a memory-backed file system (tmpfs)
# every page an mmap touches is allocated, so the first load of a shard fills its payload-index and
# vector files (~47 MB per new shard); on ext4 a load fills nothing. A writer fills them before it
# closes (``_fill_for_readers``), so that reading the store later needs no free space at all.
NEW_STORE_BYTES = {"memory": 15 * MB, "disk": 1 * MB}
FILLED_ON_LOAD = ("payload_index", "vector_storage")
MEMORY_BACKED_FS = ("tmpfs", "ramfs")


def take_lock(lock_path: Path, root: Path) -> int:
    """Take the store's exclusive lock without waiting; ``StoreError`` naming the holder if taken.

    qdrant-edge does lock each shard's WAL folder (a second load fails with an opaque "Can't init WAL:
    WouldBlock"), but only per shard and only once the shard exists; this one lock covers the whole
    store from the moment it is opened and records who holds it.
    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise StoreError(
            f"cannot write the store at {root} ({e.strerror}): query, stats, store check, store snapshot and "
            "serve (search only) work on it as it is; index and store check --repair need a store they can write"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        who = f"pid {holder}" if pid_running(holder) else "a reader that cannot write the store, while it copies it"
        raise StoreError(
            f"store at {root} is in use by another process ({who}) — stop it, "
            "or use the server / the API"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def pid_running(pid: str) -> bool:
    """Whether the pid a lock file names is a live process (a reader of a read-only store locks
    without writing its pid, so the file may still name its last writer)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True
    return True


def shard_exists(path: Path) -> bool:
    """A shard is there when its config or any of its data is: a lost ``edge_config.json`` must not
    make a store with points look empty (or be created anew over its data)."""
    return (path / EDGE_CONFIG_FILE).is_file() or (path / "wal").is_dir()


def persisted_dim(path: Path) -> int:
    # EdgeShard has no config getter in Python; the shard persists its config as JSON, and each engine
    # segment its own (``segment.json``), from which the engine rebuilds a lost shard config on load.
    sources = [path / EDGE_CONFIG_FILE, *sorted((path / "segments").glob("*/segment.json"))]
    for source in sources:
        try:
            doc = json.loads(source.read_text())
            return int((doc["vectors"] if source.name == EDGE_CONFIG_FILE else doc["config"]["vector_data"])[""]["size"])
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"cannot read the vector size of the shard at {path} from {source.name}: {e}") from None
    raise StoreError(f"the shard at {path} has neither {EDGE_CONFIG_FILE} nor segment files: it cannot be read")


def sparse_files(root: Path, folders: Sequence[str]) -> Iterator[Path]:
    """Files below ``root``, inside folders named ``folders``, with unallocated parts."""
    for dirpath, _, filenames in os.walk(root):
        if any(f in Path(dirpath).parts for f in folders):
            for name in filenames:
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:
                    continue
                if st.st_size > st.st_blocks * 512:
                    yield Path(dirpath, name)


def unfilled_bytes(root: Path, folders: Sequence[str]) -> int:
    total = 0
    for file in sparse_files(root, folders):
        st = file.stat()
        total += max(0, st.st_size - st.st_blocks * 512)
    return total


def load_fill(root: Path) -> int:
    """What loading the store at ``root`` allocates: its unfilled index and vector files on a
    memory-backed file system, nothing elsewhere (measured on tmpfs and ext4)."""
    return unfilled_bytes(root, FILLED_ON_LOAD) if fs_type(root) in MEMORY_BACKED_FS else 0


def new_store_bytes(root: Path) -> int:
    return NEW_STORE_BYTES["memory" if fs_type(root) in MEMORY_BACKED_FS else "disk"]


def fs_type(path: Path) -> str:
    """The type of the file system holding ``path`` (or its nearest existing parent), from /proc/self/mounts."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    target, best, kind = os.path.realpath(p), -1, ""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mnt = fields[1].replace("\\040", " ")
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best:
            best, kind = len(mnt), fields[2]
    return kind


def can_write(root: Path) -> bool:
    return all(os.access(p, os.W_OK) for p in (root, root / SEGMENTS_DIR) if p.exists())


def private_copy(root: Path) -> Path:
    """Copy the store at ``root`` (which this process cannot write) to a new temporary folder, holes
    kept, under a shared lock: a writer cannot start while it is copied (it gets the usual "in use"
    error), and once the copy is taken the lock is released and the copy is searched."""
    lock = root / LOCK_FILE
    fd = os.open(lock, os.O_RDONLY) if lock.exists() else None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"store at {root} is being written by another process — try again when it is done") from None
        dest = Path(tempfile.mkdtemp(prefix="use-search-readonly-")) / root.name
        try:
            for name in (SEGMENTS_DIR, IMAGES_DIR):
                if (root / name).exists():
                    copy_sparse_tree(root / name, dest / name)
            if (root / lay.LAYOUT_FILE).exists():
                shutil.copyfile(root / lay.LAYOUT_FILE, dest / lay.LAYOUT_FILE)
        except BaseException:
            shutil.rmtree(dest.parent, ignore_errors=True)
            raise
        return dest
    finally:
        if fd is not None:
            os.close(fd)


def copy_sparse_tree(src: Path, dst: Path) -> None:
    for dirpath, _, filenames in os.walk(src):
        out = dst / Path(dirpath).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            copy_sparse(Path(dirpath, name), out / name)


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy only the allocated ranges (SEEK_DATA / SEEK_HOLE), so the engine's sparse files stay sparse."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            fin.seek(start)
            fout.seek(start)
            remaining = end - start
            while remaining:
                chunk = fin.read(min(remaining, 1 << 20))
                fout.write(chunk)
                remaining -= len(chunk)
            pos = end
        fout.truncate(size)


def free_bytes(path: Path) -> int:
    """Free space (for unprivileged writers) of the file system holding ``path`` or its nearest parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def mb(n: int) -> str:
    return f"{n / MB:,.1f} MB"
