"""`serve` on a store this process cannot write (a read-only mount): a real server process answers
searches, lookups, masks, overlays and /segment of an indexed image from it, refuses uploads with 503,
writes nothing to the store's folder and leaves an unfinished upload for a server that can write to undo."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import servers
from test_reliability import cli, finish, tmpfs  # noqa: F401 - tmpfs: the read-only mount fixture


def files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_serve_searches_a_read_only_store_and_refuses_uploads(tmp_path, photos, tmpfs):  # noqa: F811
    mnt, mount = tmpfs
    assert mount("remount", "size=160m").returncode == 0  # a store: ~14 MB, ~94 MB more once loaded
    store = mnt / "store"
    data = tmp_path / "data"  # the server's data folder too (servers.api_server)
    tmp = tmp_path / "tmp"  # where the readers' private copies of the store go
    tmp.mkdir()
    rc, _, err = finish(cli(["--preset", "tiny", "--store", str(store), "index", str(photos["voc"].parent)], data))
    assert rc == 0, err
    assert mount("remount", "ro").returncode == 0
    before = files(store)
    rc, out, err = finish(cli(["--preset", "tiny", "--store", str(store), "query", "a cat", "-k", "4", "--json"], data,
                             {"TMPDIR": str(tmp)}))
    assert rc == 0, err
    expected = [json.loads(line) for line in out.splitlines()]
    assert len(expected) == 4
    unfinished = data / "uploads" / f"{'0' * 64}.png.0123456789ab.part"  # a killed server's upload, to undo
    unfinished.parent.mkdir(parents=True)
    unfinished.write_bytes(b"half")

    with servers.api_server(tmp_path, USE_SEARCH_STORE__PATH=str(store), TMPDIR=str(tmp)) as url:
        health = httpx.get(url + "/health").json()
        assert health["store"] == "read-only", health
        r = httpx.post(url + "/search", json={"text": "a cat", "k": 4}, timeout=60)
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]
        assert [h["id"] for h in hits] == [e["id"] for e in expected]
        for h, e in zip(hits, expected):  # float32 cosines of the same vectors, the same text tower
            assert abs(h["score"] - e["score"]) < 1e-5
            assert (h["path"], h["rle"]) == (e["path"], e["rle"])
        top = hits[0]
        assert httpx.get(url + f"/segments/{top['id']}").json()["path"] == top["path"]
        mask = httpx.get(url + top["mask_url"])
        assert mask.status_code == 200 and mask.content.startswith(b"\x89PNG")
        image = httpx.get(url + f"/images/{top['image_id']}").json()
        assert top["id"] in {s["id"] for s in image["segments"]}
        overlay = httpx.get(url + top["overlay_url"], timeout=60)
        assert overlay.status_code == 200 and overlay.content.startswith(b"\x89PNG")
        seg = httpx.post(url + "/segment", data={"classes": "cat,grass", "image_id": top["image_id"],
                                                 "labels_format": "none"}, timeout=120)
        assert seg.status_code == 200 and seg.json()["path"] == top["path"], seg.text

        upload = httpx.post(url + "/images", files={"file": ("coffee.png", servers.photo_bytes("coffee", 64))}, timeout=60)
        assert upload.status_code == 503, upload.text
        assert "read-only" in upload.json()["detail"] and str(store) in upload.json()["detail"]
    log = (tmp_path / "server.log").read_text()
    assert sum("read-only" in line for line in log.splitlines()) == 1, log  # said once, at start-up
    assert "Traceback" not in log, log
    assert files(store) == before
    assert unfinished.read_bytes() == b"half"  # left for a server that can write the store to undo
    assert list(tmp.glob("use-search-readonly-*")) == []  # the private copies are gone
