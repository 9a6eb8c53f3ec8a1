"""The API built from routers: the same OpenAPI document as the one-closure app it replaced, one
overlay renderer for the CLI and the API, and ``/segment`` saying which fallback labelled the pixels no
segment covers. The app runs in-process (``TestClient``) and the CLI as a real subprocess."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from fastapi.testclient import TestClient
from PIL import Image

from use_search.api import create_app
from use_search.config import Settings, StoreSettings, VotingSettings
from use_search.store.base import image_id

import servers

# /openapi.json of the app as it was before its routes became routers, with and without an API key.
BEFORE = Path(__file__).parent / "data" / "openapi.json"


def settings(tmp_path: Path, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", preset="tiny", device="cpu", offline=True,
                    store=StoreSettings(path=tmp_path / "store"), **kw)


def expected_now(before: dict) -> dict:
    """``before`` with the changes made since, each on purpose:
    - ``SegmentationOut.fallback``: /segment names what labelled the pixels no segment covers.
    - ``HealthOut.store`` "read-only" and ``POST /images``' 503: a server on a store it cannot write
      searches and refuses uploads.
    - ``SearchRequest.masks`` and ``HitOut.rle`` optional: a search may answer hits without masks.
    - ``ImageOut``: descriptions of its record's fields.

    The snapshot itself was regenerated (with the spots above as they were) for the query forms:
    ``SearchRequest`` takes ``like`` (``LikeRef``), ``other_images``, ``not``, ``all``, ``none``,
    ``group``, ``per_image`` and ``text`` is optional; ``SearchOut.images`` (``ImageMatchOut``); the
    /search 404 (an unknown ``like`` segment); ``POST /search/image`` (more like an upload).
    Added since, outside ``keyed``/``open``: ``POST /label`` and its ``Label*`` schemas (the snapshot's
    "added" part, as the open app gives them; the keyed app adds its security requirement): labels of
    the indexed images by §4.3 voting over their stored masks and vectors."""
    doc = copy.deepcopy(before)
    added = json.loads(BEFORE.read_text())["added"]
    label = copy.deepcopy(added["paths"]["/label"])
    if any("security" in op for ops in before["paths"].values() for op in ops.values()):
        label["post"]["security"] = [{"apiKey": []}]
    doc["paths"]["/label"] = label
    doc["components"]["schemas"].update(copy.deepcopy(added["schemas"]))
    out = doc["components"]["schemas"]["SegmentationOut"]
    out["properties"]["fallback"] = {
        "type": "string", "enum": ["nearest", "image", "none"], "title": "Fallback",
        "description": "What labelled the pixels no segment covers: the nearest labelled pixel's class, "
                       "the whole image's class, or none (they stay unlabeled).",
    }
    out["required"].insert(out["required"].index("unlabeled_pixels") + 1, "fallback")
    doc["components"]["schemas"]["HealthOut"]["properties"]["store"] = {
        "type": "string", "enum": ["open", "read-only", "closed"], "title": "Store",
        "description": "read-only: the server cannot write the store's folder; it searches, uploads are refused (503).",
    }
    doc["paths"]["/images"]["post"]["responses"]["503"]["description"] += " Also: the store is read-only for this server."
    # POST /search's ``masks``: false answers hits without their RLE (searches leave the masks on disk).
    doc["components"]["schemas"]["SearchRequest"]["properties"]["masks"] = {
        "type": "boolean", "title": "Masks", "default": True,
        "description": "Each hit carries its mask (rle). False: hits without it, a lighter answer; mask_url and "
                       "overlay_url still draw it.",
    }
    hit = doc["components"]["schemas"]["HitOut"]
    hit["properties"]["rle"] = {
        "anyOf": [{"$ref": "#/components/schemas/RLE"}, {"type": "null"}],
        "description": "The mask; left out when the search asked for masks=false.",
    }
    hit["required"].remove("rle")
    # GET /images/{id} says what its record's fields are.
    image = doc["components"]["schemas"]["ImageOut"]["properties"]
    image["sha256"]["description"] = "SHA-256 of the file's bytes: its content, shared by its copies."
    image["width"]["description"] = "Pixels, as stored (segment geometry is at this size)."
    image["model"]["description"] = "The model that embedded its segments."
    image["indexed_at"]["description"] = "When it was indexed (ISO 8601, UTC)."
    return doc


@pytest.mark.parametrize("keyed", [True, False])
def test_openapi_document_is_the_one_before_the_routers(tmp_path, keyed):
    before = json.loads(BEFORE.read_text())["keyed" if keyed else "open"]
    doc = create_app(settings(tmp_path), api_key="k" if keyed else None).openapi()
    assert json.loads(json.dumps(doc)) == expected_now(before)
    operations = {op["operationId"] for ops in doc["paths"].values() for op in ops.values()}
    assert operations == {"health", "metrics", "search", "get_segment", "get_mask", "get_image", "get_overlay",
                          "upload_image", "segment_image", "search_image", "label_images"}


def run_cli(args: list[str], data: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(data), "USE_SEARCH_CONFIG": "/nonexistent",
           "USE_SEARCH_STORE__PATH": str(data.parent / "store"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "use_search", "--preset", "tiny", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_cli_and_api_overlays_of_a_segment_are_pixel_identical(tmp_path, fmt):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / f"chelsea.{fmt.lower()}").write_bytes(servers.photo_bytes("chelsea", 96, fmt))
    data = tmp_path / "data"
    assert run_cli(["index", str(photos)], data).returncode == 0
    r = run_cli(["query", "a cat", "-k", "3", "--json", "--save", str(tmp_path / "ov")], data)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rows  # the tiny SAM finds few segments on a small photo
    app = create_app(settings(tmp_path))
    with TestClient(app) as client:
        for row in rows:
            got = client.get(f"/images/{image_id(row['path'])}/overlay.png", params={"segment": row["id"]})
            assert got.status_code == 200, got.text
            api = np.asarray(Image.open(io.BytesIO(got.content)).convert("RGB"))
            cli = np.asarray(Image.open(row["overlay"]).convert("RGB"))
            assert api.shape == cli.shape == (row["height"], row["width"], 3)
            assert np.array_equal(api, cli)
            assert (api != np.asarray(Image.open(photos / f"chelsea.{fmt.lower()}").convert("RGB"))).any()


@pytest.mark.parametrize("fallback", ["image", "none"])
def test_segment_names_the_fallback_it_used(tmp_path, fallback):
    app = create_app(settings(tmp_path, voting=VotingSettings(fallback=fallback)))
    with TestClient(app) as client:
        data = servers.photo_bytes("coffee", 64)
        r = client.post("/segment", data={"classes": "cup,table", "labels_format": "none"},
                        files={"file": ("c.png", data, "image/png")})
        assert r.status_code == 200, r.text
    body = r.json()
    assert body["fallback"] == fallback
    labelled = sum(m["area"] for m in body["masks"])
    assert labelled + body["unlabeled_pixels"] == body["width"] * body["height"]
    if fallback == "image":  # the whole image votes too: every pixel gets a class
        assert body["unlabeled_pixels"] == 0


def test_a_router_runs_alone_on_the_state_it_is_given(tmp_path):
    """One concern's router in a bare FastAPI app, its dependency given a state over a real store: the
    routes no longer need the whole app around them."""
    from fastapi import FastAPI

    from use_search.api.routes import segments
    from use_search.api.state import AppState
    from use_search.store import EdgeStore

    import modelfiles

    modelfiles.store_indexed_with(tmp_path / "store", "crop-clip:clip-tiny-untrained", 8, images=1)
    app = FastAPI()
    app.include_router(segments.router)
    st = AppState(settings(tmp_path))
    with EdgeStore(tmp_path / "store", "segments") as store:
        st.store = store
        app.state.use = st
        (hit,) = store.scroll_segments()
        with TestClient(app) as client:
            mask = np.asarray(Image.open(io.BytesIO(client.get(f"/segments/{hit.id}/mask.png").content))) > 0
            record = client.get(f"/segments/{hit.id}").json()
            missing = client.get("/segments/00000000-0000-0000-0000-000000000000")
    expected = np.zeros((32, 48), bool)
    expected[4:20, 6:30] = True  # what store_indexed_with wrote
    assert np.array_equal(mask, expected)
    assert record["id"] == hit.id and record["path"] == "/photos/img0.jpg" and record["filename"] == "img0.jpg"
    assert record["mask_url"] == f"/segments/{hit.id}/mask.png" and record["area"] == int(expected.sum())
    assert missing.status_code == 404
