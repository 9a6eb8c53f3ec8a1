"""`use-search label`: §4.3 voting over the stored masks (COCO RLE in the payload) and vectors.

The store tests write their own points (known rectangles, vectors equal to class text vectors) on every
backend, and check the areas against a per-pixel computation on the decoded masks written here: float64
sums of the probabilities over the covering segments, argmax. The CLI runs as a subprocess; the agreement
with `segment` is checked on images the CLI indexed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from use_search.config import Settings, StoreSettings
from use_search.factory import Runtime
from use_search.masks import decode_rle, encode_rle
from use_search.store import ImageEntry, ServerStore, VectorStore, open_store, segment_payload
from use_search.store.edge import EdgeStore
from use_search.types import SegmentPoint, point_id
from use_search.voting.combine import class_probabilities
from use_search.query.search import ModelMismatchError
from use_search.voting.stored import rle_counts, rle_runs, vote_runs
from use_search.voting.vote import UNLABELED, vote

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

CLASSES = ["cat", "dog", "sofa"]
H, W = 48, 64


def tiny_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", preset="tiny", device="cpu", offline=True,
                    store=StoreSettings(path=tmp_path / "store"))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """The tiny preset's text side (what `label` embeds the class names with) and the class vectors."""
    rt = Runtime.from_settings(tiny_settings(tmp_path_factory.mktemp("text")))
    embedder = rt.query_embedder()
    labeler = rt.labeler(store=None, embedder=embedder)  # type: ignore[arg-type]  # only its text settings
    return embedder, labeler.class_vectors(CLASSES), labeler.logit_scale


def box(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# Image "a" (48×64): A = left half, voted by the cat vector; B = top right quarter, dog; C and D, the
# same box across A's right edge, both sofa. Nothing covers the bottom right outside C/D.
A, B, CD = box(0, 48, 0, 32), box(0, 24, 32, 64), box(30, 40, 20, 44)
IMAGES = {
    "a": {"path": "/lib/2024/a.jpg", "masks": [A, B, CD, CD], "votes": ["cat", "dog", "sofa", "sofa"]},
    # Image "b" (30×20), under another folder: one segment, dog.
    "b": {"path": "/other/b.jpg", "masks": [box(5, 25, 2, 12, 30, 20)], "votes": ["dog"]},
}


def write_library(store: VectorStore, vectors: np.ndarray, model: str, also: str | None = None) -> dict:
    """Points and records of IMAGES; ``also``: a second path for image "a" (the same content)."""
    store.ensure(vectors.shape[1])
    out = {}
    for key, img in IMAGES.items():
        sha = key * 64
        paths = [img["path"], *([also] if also and key == "a" else [])]
        h, w = img["masks"][0].shape
        vecs = [vectors[CLASSES.index(c)] for c in img["votes"]]
        points = [
            SegmentPoint(point_id(sha, i), v, segment_payload(
                paths=paths, sha256=sha, width=w, height=h, segment_index=i, n_segments=len(vecs),
                rle=encode_rle(m), bbox=(0, 0, w, h), area=int(m.sum()), predicted_iou=0.9, stability_score=0.9,
                source="auto", model=model, indexed_at="2024-01-01T00:00:00+00:00"))
            for i, (m, v) in enumerate(zip(img["masks"], vecs))
        ]
        store.upsert_segments(points)
        for p in paths:
            store.put_image(ImageEntry(p, sha, w, h, len(points), model, "2024-01-01T00:00:00+00:00"))
        out[sha] = (img["masks"], np.stack(vecs))
    return out


def pixel_scores(masks: list[np.ndarray], vectors: np.ndarray, class_vectors: np.ndarray, scale: float) -> np.ndarray:
    """(C, H, W): each class's probabilities summed over the segments covering each pixel, in float64."""
    probs = class_probabilities(vectors, class_vectors, scale).astype(np.float64)
    return np.tensordot(probs.T, np.stack(masks).astype(np.float64), axes=1)


def pixel_by_pixel(masks: list[np.ndarray], vectors: np.ndarray, class_vectors: np.ndarray, scale: float) -> np.ndarray:
    """The per-pixel vote written directly: argmax of ``pixel_scores`` where some segment covers."""
    scores = pixel_scores(masks, vectors, class_vectors, scale)
    return np.where(np.stack(masks).any(axis=0), scores.argmax(axis=0), UNLABELED)


@pytest.fixture(params=["edge", "server-memory"])
def store(request, tmp_path):
    from qdrant_client import QdrantClient

    s = EdgeStore(tmp_path / "store", "segments") if request.param == "edge" else ServerStore(QdrantClient(":memory:"), "segments")
    yield s
    s.close()


# The RLE runs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_rle_runs_are_the_decoded_mask(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 300, 2)
    mask = rng.random((h, w)) < rng.random() if seed % 2 else box(h // 3, h, w // 4, w, h, w)
    mask[0, 0] = seed % 3 == 0  # a mask starting with a run of 1s (COCO: a first count of 0)
    starts, ends = rle_runs(encode_rle(mask))
    flat = np.zeros(h * w, bool)
    for s, e in zip(starts, ends):
        flat[s:e] = True
    assert (flat.reshape(w, h).T == mask).all()


def test_rle_counts_long_runs_and_negative_differences():
    """A 3000×4000 mask: counts past 2^20 (several characters per number) and differences below zero."""
    mask = box(100, 2900, 500, 3900, 3000, 4000)
    mask[1000, :] = True
    mask[::7, ::3] = False
    flat = mask.T.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    expected = np.diff(np.concatenate([[0], changes, [flat.size]]))
    assert (rle_counts(encode_rle(mask)) == expected).all()
    assert rle_counts({"size": [2, 2], "counts": [0, 3, 1]}).tolist() == [0, 3, 1]


@pytest.mark.parametrize("seed", range(6))
def test_vote_on_runs_is_the_vote_on_pixels(seed):
    """Also past 64 segments (seed 5), where a set of covering segments no longer packs into one integer."""
    rng = np.random.default_rng(seed)
    h, w, c = *rng.integers(5, 60, 2), int(rng.integers(1, 6))
    n = 70 if seed == 5 else int(rng.integers(1, 9))
    masks = rng.random((n, h, w)) < 0.3
    probs = rng.random((n, c)).astype(np.float32)
    runs = vote_runs([rle_runs(encode_rle(m)) for m in masks], probs, h * w)
    assert (runs.label_map(h, w) == vote(masks, probs)).all()


# A store the test wrote -------------------------------------------------------------------------
def test_label_areas_are_the_vote_on_the_stored_masks(store, text, tmp_path):
    embedder, class_vectors, scale = text
    written = write_library(store, class_vectors, embedder.model_id, also="/lib/2023/copy-of-a.jpg")
    labeler = Runtime.from_settings(tiny_settings(tmp_path)).labeler(store, embedder)
    labeler.check()
    vectors = labeler.class_vectors(CLASSES)
    rows = [r for e in labeler.records() if (r := labeler.label_record(e, CLASSES, vectors)) is not None]
    assert sorted(r.sha256 for r in rows) == sorted(written)  # "a" once, though it has two paths
    for r in rows:
        masks, vecs = written[r.sha256]
        expected = pixel_by_pixel(masks, vecs, vectors, scale)
        areas = {c.name: c.pixels for c in r.classes}
        assert areas == {n: int((expected == i).sum()) for i, n in enumerate(CLASSES) if (expected == i).any()}
        assert r.uncovered_pixels == r.unlabeled_pixels == int((expected == UNLABELED).sum())
        # Each class's segments: those with pixels labelled with it, and how many.
        for c in r.classes:
            got = {s["segment_index"]: s["pixels"] for s in c.segments}
            want = {i: int((m & (expected == c.index)).sum()) for i, m in enumerate(masks) if (m & (expected == c.index)).any()}
            assert got == want
    a = next(r for r in rows if r.sha256 == "a" * 64)
    assert a.paths == ["/lib/2023/copy-of-a.jpg", "/lib/2024/a.jpg"]
    # The geometry: A's pixels outside the sofa box are cat, B's are dog; outside A, B and the box, none.
    cat_only = int((A & ~CD).sum())
    assert {c.name: c.pixels for c in a.classes}["dog"] == int(B.sum())
    assert {c.name: c.pixels for c in a.classes}["cat"] >= cat_only
    assert a.uncovered_pixels == H * W - int((A | B | CD).sum())


def test_label_under_a_folder_and_the_nearest_fallback(store, text, tmp_path):
    embedder, class_vectors, _ = text
    written = write_library(store, class_vectors, embedder.model_id, also="/other/copy-of-a.jpg")
    s = tiny_settings(tmp_path)
    labeler = Runtime.from_settings(s).labeler(store, embedder)
    vectors = labeler.class_vectors(CLASSES)
    rows = [r for e in labeler.records("/lib") if (r := labeler.label_record(e, CLASSES, vectors, "/lib"))]
    assert [(r.sha256, r.paths) for r in rows] == [("a" * 64, ["/lib/2024/a.jpg"])]
    near = Runtime.from_settings(s.model_copy(update={"voting": s.voting.model_copy(update={"fallback": "nearest"})}))
    filled = near.labeler(store, embedder)
    rows = [r for e in filled.records() if (r := filled.label_record(e, CLASSES, vectors))]
    for r in rows:
        h, w = written[r.sha256][0][0].shape
        assert r.unlabeled_pixels == 0 and sum(c.pixels for c in r.classes) == h * w
    with pytest.raises(ValueError, match="none, nearest"):
        Runtime.from_settings(s.model_copy(update={"voting": s.voting.model_copy(update={"fallback": "image"})})).labeler(store, embedder)


def test_label_refuses_another_models_vectors_and_an_empty_folder(store, text, tmp_path):
    embedder, class_vectors, _ = text
    write_library(store, class_vectors, "crop-clip:someone-else")
    labeler = Runtime.from_settings(tiny_settings(tmp_path)).labeler(store, embedder)
    with pytest.raises(ModelMismatchError, match="someone-else"):
        for e in labeler.records():
            labeler.label_record(e, CLASSES, class_vectors)
    with pytest.raises(RuntimeError, match="nothing is indexed under /nowhere"):
        labeler.check("/nowhere")


# The CLI, on images it indexed ------------------------------------------------------------------
def run_cli(args: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(root / "data"), "USE_SEARCH_CONFIG": "/nonexistent",
           "USE_SEARCH_STORE__PATH": str(root / "store"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "use_search", "--preset", "tiny", *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=root)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Two photos under photos/ (one smaller than the tiny SAM's 256 px input, one larger) and one
    under other/, indexed by the CLI."""
    import skimage.data

    root = tmp_path_factory.mktemp("lib")
    for folder, name, side in (("photos", "chelsea", 200), ("photos", "coffee", 320), ("other", "astronaut", 128)):
        (root / folder).mkdir(exist_ok=True)
        img = Image.fromarray(getattr(skimage.data, name)())
        img.thumbnail((side, side))
        img.convert("RGB").save(root / folder / f"{name}.png")
    for folder in ("photos", "other"):
        r = run_cli(["index", folder], root)
        assert r.returncode == 0, r.stderr
    return root


def stored_vote(root: Path, path: Path, store_dir: Path | None = None) -> tuple[np.ndarray, list, float]:
    """The label map of one indexed image computed from its stored points, the points, and the
    smallest gap between the top two classes' summed probabilities over the covered pixels."""
    s = tiny_settings(root).model_copy(update={"store": StoreSettings(path=store_dir or root / "store")})
    with open_store(s, writable=False) as store:
        entry = store.get_image(str(path))
        points = sorted(store.read_points([point_id(entry.sha256, i) for i in range(entry.n_segments)]),
                        key=lambda p: p.payload["segment_index"])
        labeler = Runtime.from_settings(s).labeler(store)
        vectors = labeler.class_vectors(CLASSES)
        masks = [decode_rle(p.payload["rle"]) for p in points]
        vecs = np.stack([p.vector for p in points])
        top2 = np.sort(pixel_scores(masks, vecs, vectors, labeler.logit_scale), axis=0)[-2:]
        covered = np.stack(masks).any(axis=0)
        gap = float((top2[1] - top2[0])[covered].min()) if covered.any() and len(CLASSES) > 1 else np.inf
        return pixel_by_pixel(masks, vecs, vectors, labeler.logit_scale), points, gap


def test_cli_label_writes_the_vote_of_every_image_and_a_totals_table(indexed):
    r = run_cli(["label", "--classes", ",".join(CLASSES), "--out", "labels.jsonl"], indexed)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (indexed / "labels.jsonl").read_text().splitlines()]
    assert sorted(Path(p).name for row in rows for p in row["paths"]) == ["astronaut.png", "chelsea.png", "coffee.png"]
    totals = {n: 0 for n in CLASSES}
    for row in rows:
        expected, points, _ = stored_vote(indexed, Path(row["paths"][0]))
        assert {c["class"]: c["pixels"] for c in row["classes"]} == {
            n: int((expected == i).sum()) for i, n in enumerate(CLASSES) if (expected == i).any()}
        assert row["unlabeled_pixels"] == int((expected == UNLABELED).sum())
        assert (row["width"], row["height"]) == (points[0].payload["width"], points[0].payload["height"])
        for c in row["classes"]:
            totals[c["class"]] += c["pixels"]
    for n, px in totals.items():  # the totals table: one row per class with its pixels
        assert any(line.split("│")[1].strip() == n and f"{px:,}" in line for line in r.stdout.splitlines() if "│" in line), r.stdout
    under = run_cli(["label", "-c", "cat", "--under", "other", "--out", "-"], indexed)
    assert under.returncode == 0, under.stderr
    assert [Path(p).name for row in map(json.loads, under.stdout.splitlines()) for p in row["paths"]] == ["astronaut.png"]


@pytest.mark.parametrize(("args", "message"), [
    (["--classes", " , "], "give at least one non-empty class name"),
    (["--classes", "cat,cat"], "class names must be distinct"),
    (["--classes", ",".join(f"c{i}" for i in range(256))], "at most 255 classes"),
    (["--classes", "cat", "--under", "nowhere"], "--under nowhere: no such folder"),
    (["--classes", "cat", "--under", "data"], "nothing is indexed under"),
    (["--classes", "cat", "--fallback", "image"], "choose one of none, nearest"),
])
def test_cli_label_bad_input_is_a_clear_error(indexed, args, message):
    (indexed / "data").mkdir(exist_ok=True)
    r = run_cli(["label", *args, "--out", "bad.jsonl"], indexed)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


# Agreement with `segment` -----------------------------------------------------------------------
def test_label_agrees_with_segment_on_an_image_no_larger_than_the_working_size(indexed):
    """chelsea is 200 px wide, under the tiny SAM's 256 px input: `index` segments and embeds it at its
    own size, as `segment` does, so both vote with the same masks. The vectors differ only by the
    store's float32 normalisation (relative error ~1e-7), which moves a softmax at scale 100 by ~1e-5:
    the label maps are identical wherever the top two classes' summed probabilities differ by more than
    that (summed over at most N segments: N·1e-5), which the test checks is every pixel, and then
    that the maps are equal."""
    path = indexed / "photos" / "chelsea.png"
    expected, points, gap = stored_vote(indexed, path)
    assert gap > len(points) * 1e-5
    r = run_cli(["segment", str(path), "--classes", ",".join(CLASSES), "--fallback", "none", "--out", "seg.png"], indexed)
    assert r.returncode == 0, r.stderr
    seg = np.asarray(Image.open(indexed / "seg.png")).astype(np.int64)
    seg[seg == 255] = UNLABELED
    assert seg.shape == expected.shape == (points[0].payload["height"], points[0].payload["width"])
    assert (seg == expected).all()
    lab = run_cli(["label", "--classes", ",".join(CLASSES), "--under", "photos", "--out", "-"], indexed)
    row = next(x for x in map(json.loads, lab.stdout.splitlines()) if x["paths"] == [str(path)])
    assert {c["class"]: c["pixels"] for c in row["classes"]} == {
        n: int((seg == i).sum()) for i, n in enumerate(CLASSES) if (seg == i).any()}


def test_label_is_the_working_size_vote_enlarged_on_a_larger_image(tmp_path):
    """A 320×213 photo, over the tiny SAM's 256 px input: the indexer segments and embeds it at 256×170
    and stores each mask enlarged to 320×213 by nearest neighbour (``imaging.upscale_rle``). An enlarged
    pixel copies one working-size pixel in every mask at once, so it is covered by the same segments
    and gets the same vote (fallback none): the stored vote is exactly the working-size vote enlarged
    the same way. `segment` on the full image is not that (it segments the full image; SAM upsamples
    its own low-res logits), see docs/design.md. The models are built before the run, so the indexer
    knows its working size from the first image on."""
    import skimage.data

    from use_search.imaging import resize_mask, working_side
    from use_search.indexer.read import read_image
    from use_search.indexer.runner import Indexer
    from use_search.voting.predict import segment_by_voting

    (tmp_path / "photos").mkdir()
    img = Image.fromarray(skimage.data.coffee())
    img.thumbnail((320, 320))
    path = tmp_path / "photos" / "coffee.png"
    img.convert("RGB").save(path)
    s = tiny_settings(tmp_path)
    rt = Runtime.from_settings(s)
    segmenter, embedder = rt.segmenter(), rt.embedder()
    side = working_side(segmenter, s.work_side)
    with open_store(s) as store:
        report = Indexer(store, segmenter=segmenter, embedder=embedder, work_side=side).index(tmp_path / "photos")
        assert report.indexed == 1
    expected, points, gap = stored_vote(tmp_path, path)
    assert gap > len(points) * 1e-5  # as above: the float32 vectors cannot flip a pixel
    pixels = read_image(path, s.max_image_pixels, side).pixels  # decoded at the working size, as the indexer does
    votes = segment_by_voting(pixels, CLASSES, segmenter, embedder, s.voting.model_copy(update={"fallback": "none"}))
    h, w = expected.shape
    assert votes.labels.shape == (170, 256) and (h, w) == (213, 320)
    enlarged = np.full((h, w), UNLABELED)
    for c in range(len(CLASSES)):
        enlarged[resize_mask(votes.labels == c, h, w)] = c
    assert (enlarged == expected).all()


# The HTTP API, over real HTTP -------------------------------------------------------------------
def test_api_label_pages_through_the_library_with_the_stored_vote(tmp_path):
    import httpx

    from servers import api_server, photo_bytes

    with api_server(tmp_path) as base:
        for name, side in (("chelsea", 96), ("coffee", 80)):
            r = httpx.post(base + "/images", files={"file": (f"{name}.png", photo_bytes(name, side), "image/png")}, timeout=300)
            assert r.status_code == 201, r.text
        pages, offset = [], 0
        while offset is not None:
            r = httpx.post(base + "/label", json={"classes": CLASSES, "limit": 1, "offset": offset}, timeout=60)
            assert r.status_code == 200, r.text
            pages.append(r.json())
            offset = pages[-1]["next_offset"]
        bad = {
            422: [{"classes": []}, {"classes": [" "]}, {"classes": ["cat", "cat"]}, {"classes": [f"c{i}" for i in range(256)]},
                  {"classes": ["cat"], "under": "relative/dir"}, {"classes": ["cat"], "fallback": "image"},
                  {"classes": ["cat"], "limit": 0}],
            404: [{"classes": ["cat"], "under": "/nowhere"}],
        }
        answers = {code: [httpx.post(base + "/label", json=b, timeout=60) for b in bodies] for code, bodies in bad.items()}
    assert [len(p["images"]) for p in pages] == [1, 1]  # two records, one per page, no page after the last
    assert all(p["classes"] == CLASSES and p["fallback"] == "none" for p in pages)
    for code, rs in answers.items():
        for r in rs:
            assert r.status_code == code, r.text
            assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert "nothing is indexed under /nowhere" in answers[404][0].json()["detail"]
    images = [img for p in pages for img in p["images"]]
    assert len(images) == 2
    for img in images:  # the server is gone: the store can be read here
        expected, points, _ = stored_vote(tmp_path, Path(img["paths"][0]), tmp_path / "data" / "store")
        assert {c["class"]: c["pixels"] for c in img["classes"]} == {
            n: int((expected == i).sum()) for i, n in enumerate(CLASSES) if (expected == i).any()}
        assert img["unlabeled_pixels"] == int((expected == UNLABELED).sum())
        assert {s["id"] for c in img["classes"] for s in c["segments"]} <= {p.id for p in points}
