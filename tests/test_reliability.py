"""Reliability: a corpus of bad files among good photos, SIGKILL mid-run and resume, unusable stores."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from use_search.indexer.read import read_image
from use_search.store import EdgeStore, SearchFilter, StoreError

EXIT_SOME_FAILED = 3


def cli(args, data_dir, extra_env=None, **kw):
    env = {
        **os.environ, "USE_SEARCH_DATA_DIR": str(data_dir), "COLUMNS": "200", "USE_SEARCH_CONFIG": "/nonexistent",
        **(extra_env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "use_search", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw
    )


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def write_bad_corpus(root: Path, good: Path) -> dict[str, str]:
    """name → the reason's telltale words. Every file here must be skipped with that reason."""
    bad = root / "bad"
    bad.mkdir()
    data = good.read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("just some text, not a picture\n")
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 Mpx declared, a few kB on disk
    (bad / "bomb.png").write_bytes(bomb.getvalue())
    (bad / "loop").symlink_to(bad, target_is_directory=True)
    (bad / "dangling.jpg").symlink_to(bad / "does-not-exist.jpg")
    os.close(os.open(os.fsencode(bad) + b"/caf\xe9-latin1.png", os.O_CREAT | os.O_WRONLY))
    Path(os.fsdecode(os.fsencode(bad) + b"/caf\xe9-latin1.png")).write_bytes(good.read_bytes())
    os.mkfifo(bad / "b.jpg")  # reading it would block forever
    return {
        "truncated.jpg": "cannot decode", "zero.jpg": "empty file", "text.jpg": "not an image",
        "bomb.png": "pixels", "dangling.jpg": "cannot read", "latin1.png": "not valid UTF-8",
        "b.jpg": "not a regular file: it is a FIFO",
    }


def corrupt_exif_jpeg(rgb: np.ndarray) -> bytes:
    """A JPEG whose EXIF block is cut inside its first IFD entry: Pillow decodes it and warns
    "Corrupt EXIF data. Expecting to read 12 bytes but only got 5." """
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010E] = "a description long enough to sit outside the entry"
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", exif=exif)
    data = buf.getvalue()
    at = data.find(b"Exif\x00\x00")
    length = int.from_bytes(data[at - 2 : at], "big")
    keep = 6 + 8 + 2 + 5  # "Exif\0\0", TIFF header, entry count, 5 of the entry's 12 bytes
    return data[: at - 2] + (2 + keep).to_bytes(2, "big") + data[at : at + keep] + data[at - 2 + length :]


def write_odd_but_good(root: Path, voc: dict) -> list[Path]:
    """Unusual encodings of real photos that must all be indexed."""
    odd = root / "odd"
    odd.mkdir()
    rgb = voc["rgb"]
    img = Image.fromarray(rgb)
    img.convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(odd / "grey16.png")
    img.convert("L").save(odd / "grey.png")
    rgba = img.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(odd / "rgba.png")
    frames = [img, Image.fromarray(rgb[::-1].copy())]
    frames[0].save(odd / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise to display
    img.save(odd / "exif-rotated.jpg", exif=exif)
    (odd / "corrupt-exif.jpg").write_bytes(corrupt_exif_jpeg(rgb))
    return sorted(odd.iterdir())


def test_bad_files_are_reported_and_every_good_one_is_indexed(tmp_path, voc, photos):
    root = photos["voc"].parent
    expected_bad = write_bad_corpus(root, root / "voc.jpg")
    odd = write_odd_but_good(root, voc)
    rc, out, err = finish(cli(["--preset", "tiny", "index", str(root)], tmp_path / "data"))
    assert rc == EXIT_SOME_FAILED, err  # some files failed, every other one is indexed
    assert f"{len(expected_bad)} file(s) failed" in err
    for name, reason in expected_bad.items():
        line = next((ln for ln in err.splitlines() if name in ln), "")
        assert "failed" in line and reason in line, (name, reason, err)
    # Pillow's warning comes in the file's report, with its name, not raw on stderr.
    warned = [ln for ln in err.splitlines() if "Corrupt EXIF data" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning ") and "corrupt-exif.jpg" in warned[0], err
    assert "UserWarning" not in err and "warnings.warn" not in err
    with EdgeStore(tmp_path / "data" / "store", "segments") as store:
        indexed = {Path(e.path).name: e for e in store.iter_images()}
    assert set(indexed) == {"voc.jpg", "astronaut.png", "chelsea.png", "coffee.png", *(p.name for p in odd)}
    # EXIF: the stored size and masks are those of the upright image.
    upright = read_image(root / "odd" / "exif-rotated.jpg", 10**8).pixels
    assert upright.shape[:2] == (voc["rgb"].shape[1], voc["rgb"].shape[0])
    entry = indexed["exif-rotated.jpg"]
    assert (entry.height, entry.width) == upright.shape[:2]


def _snapshot(store_dir: Path) -> dict[str, tuple]:
    return _snapshot_at(store_dir)


def _snapshot_at(store_dir: Path) -> dict[str, tuple]:
    with EdgeStore(store_dir, "segments") as store:
        return {
            h.id: (h.path, h.sha256, h.segment_index, h.bbox, h.area, h.rle["counts"], h.model)
            for h in store.scroll_segments()
        }, sorted((e.path, e.sha256, e.n_segments) for e in store.iter_images())


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, photos):
    root = photos["voc"].parent
    for i in range(3):  # more images, so the kill lands mid-run
        Image.open(root / "voc.jpg").rotate(90 * (i + 1), expand=True).save(root / f"voc-{i}.png")

    started = time.monotonic()
    rc, _, err = finish(cli(["--preset", "tiny", "index", str(root)], tmp_path / "ref"))
    full_run = time.monotonic() - started
    assert rc == 0, err
    reference = _snapshot(tmp_path / "ref" / "store")

    proc = cli(["--preset", "tiny", "index", str(root)], tmp_path / "crash")
    time.sleep(full_run * 0.6)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    rc, _, err = finish(cli(["--preset", "tiny", "index", str(root)], tmp_path / "crash"))
    assert rc == 0, err
    assert _snapshot(tmp_path / "crash" / "store") == reference


def test_unreachable_server_and_locked_store_are_clear_errors(tmp_path, photos):
    rc, _, err = finish(cli(["--preset", "tiny", "--server", "http://127.0.0.1:9", "stats"], tmp_path / "d"))
    assert rc == 2 and "cannot reach Qdrant at http://127.0.0.1:9" in err and "Traceback" not in err

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from use_search.store import EdgeStore; s = EdgeStore(sys.argv[1], 'segments'); "
         "print('ready', flush=True); time.sleep(120)", str(tmp_path / "d" / "store")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        rc, _, err = finish(cli(["--preset", "tiny", "index", str(photos["voc"])], tmp_path / "d"))
        assert rc == 2 and "in use by another process" in err and "Traceback" not in err
        rc, _, err = finish(cli(["--preset", "tiny", "serve", "--port", "0"], tmp_path / "d"), timeout=120)
        lines = [ln for ln in err.splitlines() if ln.strip()]  # one line, as from the other commands
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and "in use by another process" in lines[0], err
    finally:
        holder.kill()
        holder.wait()


def test_index_help_documents_the_exit_codes(tmp_path):
    rc, out, _ = finish(cli(["index", "--help"], tmp_path / "d"))
    assert rc == 0
    text = " ".join(out.split())
    assert "Exit codes: 0" in text and f"{EXIT_SOME_FAILED} some files failed" in text and "--verify" in text


def _drop_dac_capabilities() -> None:
    """preexec_fn: remove root's permission bypass (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the
    bounding set, so the program exec'd next honours file modes as any user would."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_unreadable_folder_is_reported_and_the_rest_indexed(tmp_path, photos):
    root = photos["voc"].parent
    locked = root / "locked"
    locked.mkdir()
    (locked / "hidden.jpg").write_bytes(photos["voc"].read_bytes())
    locked.chmod(0)
    try:
        probe = subprocess.run(
            [sys.executable, "-c", f"import os; os.listdir({str(locked)!r})"], capture_output=True,
            preexec_fn=_drop_dac_capabilities if os.geteuid() == 0 else None,
        )
        if probe.returncode == 0:
            pytest.skip("a chmod-000 folder stays readable here (privileges that cannot be dropped)")
        rc, _, err = finish(cli(
            ["--preset", "tiny", "index", str(root)], tmp_path / "data",
            preexec_fn=_drop_dac_capabilities if os.geteuid() == 0 else None,
        ))
    finally:
        locked.chmod(0o755)
    assert rc == EXIT_SOME_FAILED, err
    line = next((ln for ln in err.splitlines() if str(locked) in ln), "")
    assert line.startswith("failed ") and "cannot list folder: Permission denied" in line, err
    with EdgeStore(tmp_path / "data" / "store", "segments") as store:
        assert {Path(e.path).name for e in store.iter_images()} == {"voc.jpg", "astronaut.png", "chelsea.png", "coffee.png"}


# A full disk: qdrant-edge writes through mmap, so running out of space is a SIGBUS (exit 135)
# unless the store stops first. Real small tmpfs mounts where this sandbox allows them.
@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(*opts: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(mnt)], capture_output=True, text=True)

    r = mount("size=16m")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt, mount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _free_kb(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize // 1024


def test_full_disk_at_creation_is_a_clear_error_naming_the_folder(tmp_path, photos, tmpfs):
    mnt, _ = tmpfs
    rc, _, err = finish(cli(["--preset", "tiny", "--store", str(mnt / "store"), "index", str(photos["voc"])], tmp_path / "d"))
    assert rc == 2, err
    msg = " ".join(err.split())
    assert f"not enough free disk space for the store at {mnt / 'store' / 'segments'}: 16.0 MB free" in msg
    assert "store.min_free_mb" in msg and "Traceback" not in err


@pytest.mark.slow
def test_disk_full_mid_run_stops_cleanly_and_the_rerun_after_freeing_space_completes(tmp_path, photos, tmpfs):
    mnt, mount = tmpfs
    root = photos["voc"].parent
    env = {  # ~48 segments per image, one image per commit, a 1 MB margin
        "USE_SEARCH_AMG__POINTS_PER_SIDE": "4", "USE_SEARCH_AMG__BOX_NMS_THRESH": "1.0",
        "USE_SEARCH_BATCH_IMAGES": "1", "USE_SEARCH_STORE__MIN_FREE_MB": "1",
    }
    assert mount("remount", "size=24m").returncode == 0
    store = mnt / "store"
    # Room for the new store (15 MB) and the margin, plus about one image's commit (~0.6 MB).
    filler = mnt / "filler"
    subprocess.run(["fallocate", "-l", f"{(_free_kb(mnt) - 17 * 1024)}K", str(filler)], check=True)
    rc, _, err = finish(cli(["--preset", "tiny", "--store", str(store), "index", str(root)], tmp_path / "d", extra_env=env))
    assert rc == 2, err  # a clean stop, not 135 (SIGBUS)
    assert f"not enough free disk space for the store at {store / 'segments'}" in " ".join(err.split())

    # More space (as after cleaning up): what was committed is there, whole; the rerun completes it.
    filler.unlink()
    assert mount("remount", "size=256m").returncode == 0
    before_points, before_images = _snapshot_at(store)
    assert len(before_images) < 4  # it stopped mid-run
    with EdgeStore(store, "segments") as s:
        for path, _, n in before_images:
            assert s.count_segments(SearchFilter(path=path)) == n
    rc, _, err = finish(cli(["--preset", "tiny", "--store", str(store), "index", str(root)], tmp_path / "d", extra_env=env))
    assert rc == 0, err
    after_points, after_images = _snapshot_at(store)
    assert {Path(p).name for p, _, _ in after_images} == {"voc.jpg", "astronaut.png", "chelsea.png", "coffee.png"}
    assert set(before_images) <= set(after_images)
    committed = {p for p, _, _ in before_images}
    assert {i: v for i, v in after_points.items() if v[0] in committed} == {
        i: v for i, v in before_points.items() if v[0] in committed
    }
    with EdgeStore(store, "segments") as s:
        assert s.count_segments() == sum(n for _, _, n in after_images)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_index_says_what_it_saved_and_the_store_agrees(tmp_path, photos, sig, code):
    root = photos["voc"].parent
    for i in range(4):  # more images, so the signal lands mid-run
        Image.open(root / "voc.jpg").rotate(90 * (i + 1), expand=True).save(root / f"voc-{i}.png")
    proc = cli(["--preset", "tiny", "index", str(root)], tmp_path / "d", extra_env={"USE_SEARCH_BATCH_IMAGES": "1"})
    lines = []
    for line in proc.stderr:  # the models are loaded and the run starts once the store is named
        lines.append(line)
        if line.startswith("store: "):
            break
    time.sleep(3)
    proc.send_signal(sig)
    out, rest = proc.communicate(timeout=120)
    err = "".join(lines) + rest
    assert proc.returncode == code, err
    said = [ln for ln in err.splitlines() if ln.startswith("interrupted: ")]
    assert len(said) == 1 and "Traceback" not in err, err
    saved = int(said[0].split()[1])
    assert said[0].startswith(f"interrupted: {saved} completed images are saved (") and "rerun the same command" in said[0]
    with EdgeStore(tmp_path / "d" / "store", "segments") as store:
        records = list(store.iter_images())
        assert len(records) == saved
        for e in records:
            assert store.count_segments(SearchFilter(path=e.path)) == e.n_segments
        assert f"({sum(e.n_segments for e in records)} segments)" in said[0]


@pytest.fixture
def ext4(tmp_path):
    """A 40 MB ext4 file system in a loop-mounted image file, where this sandbox allows it."""
    image, mnt = tmp_path / "ext4.img", tmp_path / "ext4"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(40 * 1024 * 1024)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    mounted = made.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip(f"cannot make and loop-mount an ext4 image here: {made.stderr.strip() or 'mount refused'}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill_up(mnt: Path, leave_kb: int) -> Path:
    filler = mnt / "filler"
    subprocess.run(["fallocate", "-l", f"{max(1, _free_kb(mnt) - leave_kb)}K", str(filler)], check=True)
    return filler


def _reads_work(store: Path, data: Path, extra_env=None) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = finish(cli(["--preset", "tiny", "--store", str(store), "stats"], data, extra_env))
    assert rc == 0 and "images: 4" in out, err
    rc, out, err = finish(cli(["--preset", "tiny", "--store", str(store), "query", "a cat", "--json"], data, extra_env))
    assert rc == 0 and len(out.splitlines()) == 4, err


@pytest.mark.parametrize("fs", ["tmpfs", "ext4"])
def test_a_full_volume_still_serves_query_and_stats(tmp_path, photos, fs, request):
    if fs == "tmpfs":
        mnt, mount = request.getfixturevalue("tmpfs")
        assert mount("remount", "size=160m").returncode == 0  # a store: ~14 MB, ~94 MB more once loaded
    else:
        mnt = request.getfixturevalue("ext4")
    store = mnt / "store"
    rc, _, err = finish(cli(["--preset", "tiny", "--store", str(store), "index", str(photos["voc"].parent)], tmp_path / "d"))
    assert rc == 0, err
    _fill_up(mnt, leave_kb=256)
    _reads_work(store, tmp_path / "d")
    rc, _, err = finish(cli(["--preset", "tiny", "--store", str(store), "index", str(photos["voc"].parent)], tmp_path / "d"))
    assert rc == 2 and "not enough free disk space" in err and "Traceback" not in err, err  # a writer is refused


def test_a_read_only_store_serves_query_stats_and_check(tmp_path, photos, tmpfs):
    mnt, mount = tmpfs
    assert mount("remount", "size=160m").returncode == 0
    store = mnt / "store"
    rc, _, err = finish(cli(["--preset", "tiny", "--store", str(store), "index", str(photos["voc"].parent)], tmp_path / "d"))
    assert rc == 0, err
    assert mount("remount", "ro").returncode == 0
    private = tmp_path / "tmp"  # where the readers' private copies go: this test's own, not the shared /tmp
    private.mkdir()
    env = {"TMPDIR": str(private)}
    _reads_work(store, tmp_path / "d", env)
    rc, out, err = finish(cli(["--preset", "tiny", "--store", str(store), "store", "check"], tmp_path / "d", env))
    assert rc == 0 and "4 images" in out and "ok" in out, err
    rc, _, err = finish(cli(["--preset", "tiny", "--store", str(store), "index", str(photos["voc"].parent)], tmp_path / "d", env))
    assert rc == 2 and "Read-only file system" in err and "Traceback" not in err, err
    assert list(private.iterdir()) == []  # the private copies are gone


def test_a_writer_that_starts_while_a_reader_copies_a_read_only_store_is_told_so(tmp_path):
    import fcntl

    with EdgeStore(tmp_path / "store", "c") as store:
        store.ensure(4)
    lock = tmp_path / "store" / "c" / ".lock"
    lock.write_text("999999999\n")  # no such process: the last writer, long gone
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what a reader of a store it cannot write holds while it copies
        with pytest.raises(StoreError, match=r"in use by another process \(a reader that cannot write the store, while it copies it\)"):
            EdgeStore(tmp_path / "store", "c")
    finally:
        os.close(fd)
    EdgeStore(tmp_path / "store", "c").close()  # free once the copy is taken


@pytest.mark.slow
def test_on_a_small_ext4_volume_a_disk_full_stop_finishes_once_space_is_freed(tmp_path, photos, ext4):
    root = photos["voc"].parent
    env = {  # ~48 segments per image, one image per commit
        "USE_SEARCH_AMG__POINTS_PER_SIDE": "4", "USE_SEARCH_AMG__BOX_NMS_THRESH": "1.0", "USE_SEARCH_BATCH_IMAGES": "1",
    }
    store = ext4 / "store"
    filler = _fill_up(ext4, leave_kb=(16 + 1) * 1024 + 1536)  # the margin, a new store, about two images' commits
    rc, _, err = finish(cli(["--preset", "tiny", "--store", str(store), "index", str(root)], tmp_path / "d", extra_env=env))
    assert rc == 2 and "not enough free disk space" in err and "Traceback" not in err, err
    with EdgeStore(store, "segments", writable=False) as s:
        assert s.count_images() < 4  # it stopped mid-run
    filler.unlink()  # the same 40 MB volume, the filler deleted
    rc, _, err = finish(cli(["--preset", "tiny", "--store", str(store), "index", str(root)], tmp_path / "d", extra_env=env))
    assert rc == 0, err
    with EdgeStore(store, "segments", writable=False) as s:
        images = list(s.iter_images())
        assert len(images) == 4
        assert s.count_segments() == sum(e.n_segments for e in images)
