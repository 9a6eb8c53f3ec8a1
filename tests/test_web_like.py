"""The web page's "more like this" in headless Chromium: a segment's more-like-this list (its own
segment left out), reached as the viewer's button reaches it (``?like=SEGMENT_ID``); saves a screenshot.
Skipped like test_web.py when no chromium binary is installed."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image
from test_web import CHROMIUM, chromium

import servers
from servers import api_server

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("web-like")
    with api_server(root) as url:
        for name in ("chelsea", "coffee", "astronaut"):
            r = httpx.post(url + "/images", files={"file": (f"{name}.png", servers.photo_bytes(name, 96), "image/png")}, timeout=120)
            assert r.status_code == 201, r.text
        yield url


def test_more_like_this_lists_the_nearest_other_segments(base, tmp_path):
    r = httpx.post(base + "/search", json={"text": "a cat", "k": 1}, timeout=60)
    first = r.json()["hits"][0]
    want = httpx.post(base + "/search", json={"like": [{"segment_id": first["id"]}], "k": 24, "dedup": True}, timeout=60).json()
    page = f"{base}/?like={first['id']}"
    dom = chromium(tmp_path, "--dump-dom", page)
    html = dom.stdout.decode(errors="replace")
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    assert f"{want['count']} segments like segment {first['id']}" in html
    shown = re.findall(r'class="hit" data-id="([0-9a-f-]+)"', html)
    assert shown == [h["id"] for h in want["hits"]] and first["id"] not in shown and len(shown) >= 1
    assert 'id="more"' in html  # the viewer's button that leads here

    shot = tmp_path / "web-more-like-this.png"
    r = chromium(tmp_path, f"--screenshot={shot}", page)
    assert r.returncode == 0 and shot.is_file(), r.stderr.decode(errors="replace")[-2000:]
    assert Image.open(shot).size == (1200, 800)
    keep = os.environ.get("USE_SEARCH_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    print(f"screenshot: {shot}")
