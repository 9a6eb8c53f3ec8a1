"""The web page in headless Chromium (Debian's ``chromium``): loads, searches, shows results; saves a
screenshot. Skipped, with the reason, when no chromium binary is installed."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import skimage.data
from PIL import Image

from servers import api_server

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium here (Debian: apt-get install chromium)"
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    with api_server(root) as url:
        img = Image.fromarray(skimage.data.chelsea())
        img.thumbnail((128, 128))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        r = httpx.post(url + "/images", files={"file": ("Chelsea the cat.png", buf.getvalue(), "image/png")}, timeout=120)
        assert r.status_code == 201, r.text  # stored as <sha256>.png; the page shows the name it came with
        yield url


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=30000", "--window-size=1200,800", *args,
    ]
    return subprocess.run(cmd, capture_output=True, timeout=120)


def test_page_searches_and_shows_results(base, tmp_path):
    # ?q= makes the page run the search on load, as typing + Enter would.
    page = f"{base}/?q=a%20cat"
    dom = chromium(tmp_path, "--dump-dom", page)
    html = dom.stdout.decode(errors="replace")
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    assert 'id="q"' in html
    assert html.count('class="hit"') >= 1, html[-3000:]
    assert "segments for" in html  # the status line after a successful search
    assert 'src="blob:' in html  # overlay PNGs were fetched and shown
    assert "Chelsea the cat.png · seg" in html and not re.search(r"[0-9a-f]{64}\.png · seg", html)
    warn = re.search(r'<div id="warn"[^>]*>(.*?)</div>', html, re.S)
    assert warn and "hidden" not in warn.group(0) and "Untrained models" in warn.group(1)  # /health: untrained

    shot = tmp_path / "web-search.png"
    r = chromium(tmp_path, f"--screenshot={shot}", page)
    assert r.returncode == 0 and shot.is_file(), r.stderr.decode(errors="replace")[-2000:]
    img = Image.open(shot)
    assert img.size == (1200, 800)
    keep = os.environ.get("USE_SEARCH_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    print(f"screenshot: {shot}")
