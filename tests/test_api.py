"""The HTTP API against a real uvicorn process on 127.0.0.1 (tiny preset, embedded store), via httpx."""

from __future__ import annotations

import base64
import io
import re
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from use_search.masks import decode_rle
from use_search.voting.png import read_label_png
from use_search.voting.vote import UNLABELED
from use_search.store.base import image_id

import servers
from servers import api_server

KEY = "test-key-123"
MAX_UPLOAD = 300_000
SIDE = 128  # small photos: the tiny SAM on a shared CPU


def photo_bytes(name: str, fmt: str = "PNG") -> bytes:
    return servers.photo_bytes(name, SIDE, fmt)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    with api_server(root, USE_SEARCH_API_KEY=KEY, USE_SEARCH_MAX_UPLOAD_BYTES=str(MAX_UPLOAD)) as base:
        yield {"base": base, "data": root / "data", "log": root / "server.log"}


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server["base"], headers={"X-API-Key": KEY}, timeout=120) as c:
        yield c


def counts(client: httpx.Client) -> tuple[int, int]:
    text = client.get("/metrics").text
    imgs = re.search(r"^use_search_images (\S+)$", text, re.M)
    segs = re.search(r"^use_search_segments (\S+)$", text, re.M)
    return int(float(imgs.group(1))), int(float(segs.group(1)))


@pytest.fixture(scope="module")
def uploaded(client):
    out = {}
    for name, fmt in (("chelsea", "JPEG"), ("coffee", "PNG")):
        r = client.post("/images", files={"file": (f"{name}.{fmt.lower()}", photo_bytes(name, fmt), f"image/{fmt.lower()}")})
        assert r.status_code == 201, r.text
        out[name] = r.json()
    return out


def test_health_open_and_auth_required(server):
    base = server["base"]
    r = httpx.get(base + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["untrained"] is True
    some_id = str(uuid.uuid4())
    for method, path, kw in [
        ("POST", "/search", {"json": {"text": "cat"}}),
        ("GET", f"/segments/{some_id}", {}),
        ("GET", f"/segments/{some_id}/mask.png", {}),
        ("GET", f"/images/{some_id}/overlay.png", {}),
        ("GET", "/metrics", {}),
        ("POST", "/images", {"files": {"file": ("a.png", b"x")}}),
    ]:
        for headers in ({}, {"X-API-Key": "wrong"}):
            r = httpx.request(method, base + path, headers=headers, timeout=10, **kw)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert "API key" in r.json()["detail"]


def test_upload_indexes_and_reupload_is_idempotent(client, server, uploaded):
    for name, body in uploaded.items():
        assert body["status"] == "indexed" and body["n_segments"] > 0
        assert body["id"] == image_id(body["path"])
        p = Path(body["path"])
        assert p.parent == server["data"] / "uploads" and p.stem == body["sha256"] and p.is_file()
        assert (body["width"], body["height"]) == Image.open(p).size
    assert p.suffix == ".png" and Path(uploaded["chelsea"]["path"]).suffix == ".jpg"
    before = counts(client)
    assert before == (2, sum(b["n_segments"] for b in uploaded.values()))
    r = client.post("/images", files={"file": ("again.png", photo_bytes("coffee"), "image/png")})
    assert r.status_code == 200 and r.json()["status"] == "exists"
    assert counts(client) == before
    info = client.get(f"/images/{uploaded['coffee']['id']}").json()
    assert info["n_segments"] == uploaded["coffee"]["n_segments"] == len(info["segments"])


def test_search_hits_and_filters(client, uploaded):
    r = client.post("/search", json={"text": "a cat", "k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert 1 <= len(hits) <= 5
    for h in hits:
        assert {"id", "score", "path", "bbox", "area", "rle", "width", "height", "image_id"} <= h.keys()
        assert decode_rle(h["rle"]).shape == (h["height"], h["width"])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    only = uploaded["coffee"]["path"]
    r = client.post("/search", json={"text": "a cup", "k": 50, "filters": {"path": only}})
    assert r.status_code == 200 and {h["path"] for h in r.json()["hits"]} == {only}
    r = client.post("/search", json={"text": "a cup", "k": 50, "filters": {"under": "/nowhere/else"}})
    assert r.json()["hits"] == []
    r = client.post("/search", json={"text": "a cup", "k": 3, "dedup": True, "min_score": -1.0})
    assert r.status_code == 200 and len(r.json()["hits"]) <= 3


def test_search_malformed_requests(client):
    r = client.post("/search", content=b'{"text": "cat", ', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"]
    for body in ({"k": 3}, {"text": "", "k": 3}, {"text": "cat", "k": 0}):
        r = client.post("/search", json=body)
        assert r.status_code == 422 and isinstance(r.json()["detail"], str), body


def test_segment_and_mask_png(client, uploaded):
    hit = client.post("/search", json={"text": "coffee", "k": 1}).json()["hits"][0]
    r = client.get(f"/segments/{hit['id']}")
    assert r.status_code == 200
    seg = r.json()
    assert seg["id"] == hit["id"] and seg["rle"] == hit["rle"] and seg["bbox"] == hit["bbox"]
    r = client.get(f"/segments/{hit['id']}/mask.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    png = np.asarray(Image.open(io.BytesIO(r.content)))
    np.testing.assert_array_equal(png > 0, decode_rle(seg["rle"]))
    assert int((png > 0).sum()) == seg["area"]


def test_search_without_masks_keeps_box_and_area_and_the_mask_route_draws_it(client, uploaded):
    full = client.post("/search", json={"text": "coffee", "k": 5}).json()["hits"]
    r = client.post("/search", json={"text": "coffee", "k": 5, "masks": False})
    assert r.status_code == 200, r.text
    light = r.json()["hits"]
    assert [h["id"] for h in light] == [h["id"] for h in full]
    for with_mask, without in zip(full, light):
        assert without["rle"] is None
        assert {k: v for k, v in without.items() if k != "rle"} == {k: v for k, v in with_mask.items() if k != "rle"}
        png = np.asarray(Image.open(io.BytesIO(client.get(without["mask_url"]).content)))
        np.testing.assert_array_equal(png > 0, decode_rle(with_mask["rle"]))


def test_unknown_and_malformed_ids(client):
    assert client.get(f"/segments/{uuid.uuid4()}").status_code == 404
    assert client.get(f"/segments/{uuid.uuid4()}/mask.png").status_code == 404
    assert client.get(f"/images/{uuid.uuid4()}/overlay.png").status_code == 404
    # An id that is no UUID reaches the route and fails its typed path parameter: 422 naming it.
    for bad, why in (("not-a-uuid", "invalid character: found `n` at 0"), ("1234", "invalid length: found 4")):
        for path, param in ((f"/segments/{bad}", "seg_id"), (f"/segments/{bad}/mask.png", "seg_id"),
                            (f"/images/{bad}/overlay.png", "img_id")):
            r = client.get(path)
            assert r.status_code == 422 and r.headers["content-type"] == "application/json", (path, r.text)
            assert r.json()["detail"] == f"path.{param}: Input should be a valid UUID, {why}", path
    # An encoded "/" in the id decodes to more path segments: no route has that shape, so the router
    # answers 404 before any handler (or the disk) is reached.
    for bad in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
        for path in (f"/segments/{bad}", f"/segments/{bad}/mask.png", f"/images/{bad}/overlay.png"):
            r = client.get(path)
            assert r.status_code == 404 and r.json() == {"detail": "Not Found"}, (path, r.text)


def test_overlay_png(client, uploaded):
    up = uploaded["chelsea"]
    r = client.get(f"/images/{up['id']}/overlay.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (up["width"], up["height"])
    seg_id = client.get(f"/images/{up['id']}").json()["segments"][0]["id"]
    r = client.get(f"/images/{up['id']}/overlay.png", params={"segment": seg_id})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (up["width"], up["height"])
    other = client.get(f"/images/{uploaded['coffee']['id']}").json()["segments"][0]["id"]
    assert client.get(f"/images/{up['id']}/overlay.png", params={"segment": other}).status_code == 404


def _check_labels(body: dict, classes: list[str], width: int, height: int) -> None:
    labels = read_label_png(base64.b64decode(body["labels_png"]))
    assert labels.shape == (height, width) == (body["height"], body["width"])
    assert set(np.unique(labels)) <= {UNLABELED, *range(len(classes))}
    assert [m["class"] for m in body["masks"]] == classes
    for i, m in enumerate(body["masks"]):
        np.testing.assert_array_equal(decode_rle(m["rle"]), labels == i)
    assert body["unlabeled_pixels"] == int((labels == UNLABELED).sum())


def test_semantic_segment_indexed_and_upload(client, uploaded):
    up = uploaded["coffee"]
    classes = ["cup", "table", "background"]
    r = client.post("/segment", data={"image_id": up["id"], "classes": classes})
    assert r.status_code == 200, r.text
    _check_labels(r.json(), classes, up["width"], up["height"])
    data = photo_bytes("astronaut")
    w, h = Image.open(io.BytesIO(data)).size
    r = client.post("/segment", data={"classes": "person,flag"}, files={"file": ("a.png", data, "image/png")})
    assert r.status_code == 200, r.text
    _check_labels(r.json(), ["person", "flag"], w, h)
    assert client.post("/segment", data={"classes": "a"}).status_code == 422  # neither image nor id
    r = client.post("/segment", data={"classes": "a"}, files={"file": ("x.png", b"garbage", "image/png")})
    assert r.status_code == 400 and r.json()["detail"]


def test_corrupt_and_oversized_uploads_store_nothing(client, server, uploaded):
    before = counts(client)
    files_before = sorted(p.name for p in (server["data"] / "uploads").iterdir())
    good = photo_bytes("chelsea", "JPEG")
    # A well-formed request whose file is no usable image is 400 (422 is for invalid parameters): refused
    # from the header before any work (empty, text), or when the worker decodes it (a truncated JPEG's
    # header is whole).
    refusals = [("broken.jpg", good[: len(good) // 3], "cannot decode: image file is truncated"),
                ("text.png", b"this is not an image", "not an image (unrecognised format)"), ("empty.png", b"", "empty file")]
    for name, data, why in refusals:
        r = client.post("/images", files={"file": (name, data, "image/jpeg")})
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert r.json()["detail"].startswith(f"not a usable image: {why}"), r.text
    big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    assert len(buf.getvalue()) > MAX_UPLOAD
    r = client.post("/images", files={"file": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert counts(client) == before
    assert sorted(p.name for p in (server["data"] / "uploads").iterdir()) == files_before


def test_metrics_and_page(client, server, uploaded):
    text = client.get("/metrics").text
    assert "use_search_http_requests_total" in text and "use_search_http_request_seconds_bucket" in text
    assert re.search(r'use_search_http_requests_total\{method="POST",route="/search",status="200"\} [1-9]', text)
    r = httpx.get(server["base"] + "/")  # the page itself holds no data: no key needed
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and 'id="q"' in r.text
