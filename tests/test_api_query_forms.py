"""The query forms over real HTTP (``use-search serve``, tiny preset): more like a stored segment or an
upload, negatives, several phrases in one photo, one row per image, and the 4xx of bad input. The exact
rankings are checked on known vectors in test_query_forms.py; here, what the API adds: its fields,
exclusions, shapes and errors."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

import servers
from servers import api_server

SIDE = 96  # small photos: the tiny SAM on a shared CPU


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-forms")
    with api_server(root) as base, httpx.Client(base_url=base, timeout=180) as c:
        for name in ("chelsea", "coffee", "astronaut"):
            r = c.post("/images", files={"file": (f"{name}.png", servers.photo_bytes(name, SIDE), "image/png")})
            assert r.status_code == 201, r.text
        yield c


def search(client: httpx.Client, **body) -> dict:  # type: ignore[no-untyped-def]
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_like_leaves_out_its_segment_and_with_other_images_its_image(client: httpx.Client) -> None:
    first = search(client, text="a cat", k=1)["hits"][0]
    hits = search(client, like=[{"segment_id": first["id"]}], k=200)["hits"]
    ids = [h["id"] for h in hits]
    assert first["id"] not in ids and len(ids) == len(set(ids)) > 0
    # (the tiny SAM finds one mask per small photo: that the same image's other segments stay is
    # checked on known vectors in test_query_forms.py)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)
    others = search(client, like=[{"segment_id": first["id"]}], other_images=True, k=200)["hits"]
    assert others and all(h["sha256"] != first["sha256"] for h in others)
    assert [h["id"] for h in others] == [h["id"] for h in hits if h["sha256"] != first["sha256"]]


def test_text_like_and_negatives_combine(client: httpx.Client) -> None:
    first = search(client, text="a cat", k=1)["hits"][0]
    both = search(client, text="a cat", like=[{"segment_id": first["id"]}], k=5)["hits"]
    assert both and first["id"] not in {h["id"] for h in both}
    plain = search(client, text="a cat", k=200)["hits"]
    negated = search(client, text="a cat", **{"not": ["a cup of coffee"]}, k=200)["hits"]
    assert {h["id"] for h in plain} == {h["id"] for h in negated}  # the same segments, scored otherwise
    assert [h["score"] for h in negated] == sorted((h["score"] for h in negated), reverse=True)
    assert any(abs(n["score"] - p["score"]) > 1e-3 for p, n in zip(sorted(plain, key=lambda h: h["id"]), sorted(negated, key=lambda h: h["id"])))


def test_all_gives_images_with_a_segment_per_phrase(client: httpx.Client) -> None:
    body = search(client, all=["a cat", "a cup"], k=10)
    assert body["hits"] == [] and body["count"] == len(body["images"]) == 3  # without min_score every image ranks
    for row in body["images"]:
        assert row["phrases"] == ["a cat", "a cup"] and len(row["segments"]) == 2
        assert all(s["sha256"] == row["sha256"] and s["rle"]["counts"] for s in row["segments"])
        assert row["score"] == pytest.approx(min(s["score"] for s in row["segments"]), abs=1e-6)
    top = body["images"][0]["score"]
    assert search(client, all=["a cat", "a cup"], min_score=top + 1e-4)["images"][:1] != body["images"][:1]
    dropped = search(client, all=["a cat"], none=["a cup"], min_score=-1.0)["images"]
    assert dropped == []  # every image has some segment at or above -1 for "a cup"


def test_group_gives_one_row_per_image(client: httpx.Client) -> None:
    body = search(client, text="a cat", group="image", per_image=2, k=10)
    rows = body["images"]
    assert len({r["sha256"] for r in rows}) == len(rows) == 3
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    for r in rows:
        assert 1 <= len(r["segments"]) <= 2 and r["score"] == r["segments"][0]["score"]
        assert all(s["sha256"] == r["sha256"] for s in r["segments"])
    flat = search(client, text="a cat", k=200)["hits"]
    best = {}
    for h in flat:
        best.setdefault(h["sha256"], h["id"])
    assert [r["segments"][0]["id"] for r in rows] == list(best.values())


def test_more_like_an_upload(client: httpx.Client) -> None:
    photo = servers.photo_bytes("chelsea", SIDE)
    whole = client.post("/search/image", files={"file": ("c.png", photo, "image/png")}, data={"k": "3"})
    assert whole.status_code == 200, whole.text
    assert len(whole.json()["hits"]) == 3
    grouped = client.post("/search/image", files={"file": ("c.png", photo, "image/png")}, data={"group": "image"})
    assert grouped.status_code == 200 and len(grouped.json()["images"]) == 3
    outside = client.post("/search/image", files={"file": ("c.png", photo, "image/png")}, data={"x": "5000", "y": "1"})
    assert outside.status_code == 422 and "outside the image" in outside.json()["detail"]
    half = client.post("/search/image", files={"file": ("c.png", photo, "image/png")}, data={"x": "3"})
    assert half.status_code == 422 and "both x and y" in half.json()["detail"]


def test_more_like_the_segment_under_a_point(client: httpx.Client) -> None:
    # The segment under a point: the stored segments of this same photo say where a mask is.
    from use_search.masks import decode_rle

    cat = search(client, text="a cat", group="image", per_image=1, k=3)["images"]
    seg = next(r for r in cat if r["path"].endswith(".png"))["segments"][0]
    ys, xs = np.nonzero(decode_rle(seg["rle"]))
    photo = servers.photo_bytes("chelsea", SIDE)
    r = client.post("/search/image", files={"file": ("c.png", photo, "image/png")},
                    data={"x": str(int(xs[len(xs) // 2])), "y": str(int(ys[len(ys) // 2]))})
    # the upload is segmented again (same tiny SAM, same pixels): a mask covers that point, or the
    # answer says none does
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert "no segment covers pixel" in r.json()["detail"]
    else:
        assert r.json()["hits"]


@pytest.mark.parametrize("body,status,words", [
    ({"like": [{"segment_id": "00000000-0000-0000-0000-000000000000"}]}, 404, "no segment with id"),
    ({"all": ["a dog"] * 50}, 422, "at most 8"),
    ({"all": []}, 422, "at least 1"),
    ({"like": []}, 422, "at least 1"),
    ({"text": "a cat", "not": []}, 422, "at least 1"),
    ({"k": 3}, 422, "give text, like"),
    ({"all": ["a cat"], "text": "a dog"}, 422, "cannot be combined"),
    ({"all": ["a cat"], "none": ["a dog"]}, 422, "none needs all and min_score"),
    ({"text": "a cat", "not_": ["x"]}, 422, "Extra inputs"),
])
def test_bad_input_is_a_clear_4xx(client: httpx.Client, body: dict, status: int, words: str) -> None:
    r = client.post("/search", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"] or words in str(r.json().get("errors"))
