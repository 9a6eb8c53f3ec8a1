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
from use_search.store import EdgeStore



def cli(args, data_dir, **kw):
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(data_dir), "COLUMNS": "200", "USE_SEARCH_CONFIG": "/nonexistent"}
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
    return {
        "truncated.jpg": "cannot decode", "zero.jpg": "empty file", "text.jpg": "not an image",
        "bomb.png": "pixels", "dangling.jpg": "cannot read", "latin1.png": "not valid UTF-8",
    }


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
    return sorted(odd.iterdir())


def test_bad_files_are_reported_and_every_good_one_is_indexed(tmp_path, voc, photos):
    root = photos["voc"].parent
    expected_bad = write_bad_corpus(root, root / "voc.jpg")
    odd = write_odd_but_good(root, voc)
    rc, out, err = finish(cli(["--preset", "tiny", "index", str(root)], tmp_path / "data"))
    assert rc == 0, err
    for name, reason in expected_bad.items():
        line = next((ln for ln in err.splitlines() if name in ln), "")
        assert "failed" in line and reason in line, (name, reason, err)
    with EdgeStore(tmp_path / "data" / "store", "segments") as store:
        indexed = {Path(e.path).name: e for e in store.iter_images()}
    assert set(indexed) == {"voc.jpg", "astronaut.png", "chelsea.png", "coffee.png", *(p.name for p in odd)}
    # EXIF: the stored size and masks are those of the upright image.
    upright = read_image(root / "odd" / "exif-rotated.jpg", 10**8).pixels
    assert upright.shape[:2] == (voc["rgb"].shape[1], voc["rgb"].shape[0])
    entry = indexed["exif-rotated.jpg"]
    assert (entry.height, entry.width) == upright.shape[:2]


def _snapshot(store_dir: Path) -> dict[str, tuple]:
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
    finally:
        holder.kill()
        holder.wait()
