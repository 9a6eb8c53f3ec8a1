"""The query forms (more like this, negatives, --all / --none, --group image) on every store backend,
over vectors this test writes itself: each expected result is computed here from the geometry."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
from test_store_contract import DIM, entry, make_point, open_backend, store  # noqa: F401  (``store``: the backend fixture, made by ``open_backend``)

from use_search.query.forms import Ask, QueryInputError, UnknownSegmentError, all_of, images, segments
from use_search.query.search import Searcher
from use_search.store import VectorStore
from use_search.types import SegmentPoint, point_id

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

# float32 vectors, cosines of unit vectors: each score carries a few float32 roundings (~1e-7 each).
TOL = 1e-5


def unit(*pairs: tuple[int, float]) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    for axis, value in pairs:
        v[axis] = value
    return (v / np.linalg.norm(v)).astype(np.float32)


DOG, FRISBEE, GRASS, SKY = 0, 1, 2, 3
TEXTS = {"a dog": unit((DOG, 1)), "a frisbee": unit((FRISBEE, 1)), "grass": unit((GRASS, 1)), "sky": unit((SKY, 1))}
# image -> its segments' vectors. A: a dog and a frisbee; B: two dogs, one on grass, one under sky;
# C: a dog with a frisbee in one segment and a frisbee on grass; D: a frisbee only.
SCENE = {
    "/p/a.jpg": [unit((DOG, 1)), unit((FRISBEE, 1))],
    "/p/b.jpg": [unit((DOG, 1), (GRASS, 0.2)), unit((DOG, 1), (SKY, 0.5))],
    "/p/c.jpg": [unit((DOG, 1), (FRISBEE, 0.6)), unit((FRISBEE, 1), (GRASS, 0.3))],
    "/p/d.jpg": [unit((FRISBEE, 1), (4, 0.1))],
}


def sha(path: str) -> str:
    return path[3] * 64


def pid(path: str, i: int) -> str:
    return point_id(sha(path), i)


class Texts:
    """The test's text embedder: each phrase is a known direction."""

    model_id = "m1"
    dim = DIM
    untrained = False

    def embed_texts(self, texts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        return np.stack([TEXTS[t] for t in texts])


@pytest.fixture
def searcher(store: VectorStore) -> Searcher:  # noqa: F811
    store.ensure(DIM)
    points: list[SegmentPoint] = [
        make_point(path, sha(path), i, len(vs), v) for path, vs in SCENE.items() for i, v in enumerate(vs)
    ]
    store.upsert_segments(points)
    for path, vs in SCENE.items():
        store.put_image(entry(path, sha(path), len(vs)))
    return Searcher(store, Texts())


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def ranking(score) -> list[tuple[str, float]]:  # type: ignore[no-untyped-def]
    """Every stored segment by ``score(vector)``, best first."""
    rows = [(pid(p, i), score(v)) for p, vs in SCENE.items() for i, v in enumerate(vs)]
    return sorted(rows, key=lambda r: -r[1])


def assert_hits(hits, expected: list[tuple[str, float]]) -> None:  # type: ignore[no-untyped-def]
    """Same ids in the same order and the same scores; segments with equal scores (orthogonal to the
    query: 0.0) may come in any order among themselves."""
    assert len(hits) == len(expected)
    for h, (_, s) in zip(hits, expected):
        assert h.score == pytest.approx(s, abs=TOL)
    ties = lambda rows: [frozenset(i for i, t in rows if abs(t - s) <= TOL) for _, s in rows]  # noqa: E731
    assert ties([(h.id, h.score) for h in hits]) == ties(expected)


# More like this ----------------------------------------------------------------------------------
def test_like_ranks_by_cosine_to_the_example_and_leaves_it_out(searcher: Searcher) -> None:
    example = SCENE["/p/a.jpg"][0]
    expected = [r for r in ranking(lambda v: cos(v, example)) if r[0] != pid("/p/a.jpg", 0)]
    assert_hits(segments(searcher, Ask(like=[pid("/p/a.jpg", 0)]), k=10), expected)


def test_like_other_images_leaves_out_the_examples_image(searcher: Searcher) -> None:
    example = SCENE["/p/a.jpg"][0]
    expected = [r for r in ranking(lambda v: cos(v, example)) if not r[0].startswith(tuple(pid("/p/a.jpg", i) for i in range(2)))]
    hits = segments(searcher, Ask(like=[pid("/p/a.jpg", 0)], other_images=True), k=10)
    assert_hits(hits, expected)
    assert sha("/p/a.jpg") not in {h.sha256 for h in hits}


def test_text_and_like_combine_as_mean_cosine(searcher: Searcher) -> None:
    example = SCENE["/p/d.jpg"][0]
    text = TEXTS["a dog"]
    expected = [r for r in ranking(lambda v: (cos(v, text) + cos(v, example)) / 2) if r[0] != pid("/p/d.jpg", 0)]
    assert_hits(segments(searcher, Ask(texts=["a dog"], like=[pid("/p/d.jpg", 0)]), k=3), expected[:3])


def test_like_min_score_and_unknown_id(searcher: Searcher) -> None:
    example = SCENE["/p/a.jpg"][0]
    expected = [r for r in ranking(lambda v: cos(v, example)) if r[0] != pid("/p/a.jpg", 0) and r[1] >= 0.9]
    assert_hits(segments(searcher, Ask(like=[pid("/p/a.jpg", 0)], min_score=0.9), k=10), expected)
    with pytest.raises(UnknownSegmentError, match="no segment with id 00000000-0000-0000-0000-000000000000"):
        segments(searcher, Ask(like=["00000000-0000-0000-0000-000000000000"]))
    with pytest.raises(QueryInputError, match="give a text or a segment"):
        segments(searcher, Ask())


# Negatives ---------------------------------------------------------------------------------------
def test_a_negative_changes_the_order(searcher: Searcher) -> None:
    dog, grass = TEXTS["a dog"], TEXTS["grass"]
    b_grass, b_sky = pid("/p/b.jpg", 0), pid("/p/b.jpg", 1)
    plain = [h.id for h in segments(searcher, Ask(texts=["a dog"]), k=10)]
    assert plain.index(b_grass) < plain.index(b_sky)  # the dog on grass is nearer to "a dog"...
    expected = ranking(lambda v: cos(v, dog) - cos(v, grass))
    hits = segments(searcher, Ask(texts=["a dog"], negatives=["grass"]), k=10)
    assert_hits(hits, expected)
    ids = [h.id for h in hits]
    assert ids.index(b_sky) < ids.index(b_grass)  # ...and below the other dog once grass is a negative


# Several things in one photo ---------------------------------------------------------------------
def best_per_phrase(path: str, phrases: Sequence[str]) -> list[tuple[str, float]]:
    out = []
    for p in phrases:
        scores = [cos(v, TEXTS[p]) for v in SCENE[path]]
        i = int(np.argmax(scores))
        out.append((pid(path, i), scores[i]))
    return out


def test_all_ranks_images_by_their_weakest_phrase(searcher: Searcher) -> None:
    phrases = ["a dog", "a frisbee"]
    # Every image ranks, by its weakest phrase: B (no frisbee) and D (no dog) score 0.0, last, tied.
    ranked = [m.path for m in all_of(searcher, phrases, k=10)]
    assert ranked[:2] == ["/p/a.jpg", "/p/c.jpg"] and set(ranked[2:]) == {"/p/b.jpg", "/p/d.jpg"}
    found = all_of(searcher, phrases, k=10, min_score=0.5)  # a phrase matches from 0.5 on
    assert [m.path for m in found] == ["/p/a.jpg", "/p/c.jpg"]
    for m in found:
        want = best_per_phrase(m.path, phrases)
        assert [h.id for h in m.segments] == [i for i, _ in want]
        assert m.score == pytest.approx(min(s for _, s in want), abs=TOL)
        assert m.phrases == phrases
        assert all(h.rle["size"] == [48, 64] for h in m.segments)  # each matched segment comes with its mask


def test_none_drops_images_with_a_segment_for_the_phrase(searcher: Searcher) -> None:
    # C's frisbee lies on grass: cos(grass) = 0.3 / sqrt(1.09) ≈ 0.287; A has nothing of grass.
    assert [m.path for m in all_of(searcher, ["a dog", "a frisbee"], none=["grass"], min_score=0.25)] == ["/p/a.jpg"]
    assert [m.path for m in all_of(searcher, ["a dog", "a frisbee"], none=["grass"], min_score=0.3)] == ["/p/a.jpg", "/p/c.jpg"]
    with pytest.raises(QueryInputError, match="--none needs --min-score"):
        all_of(searcher, ["a dog"], none=["grass"])


def test_all_misses_an_image_beyond_the_candidate_bound(searcher: Searcher) -> None:
    # "a dog"'s two best segments are A's (1.0) and B's dog on grass (0.98): C's dog (0.86) is not
    # among them, so with a bound of 2 C is missed although it shows both phrases.
    assert [m.path for m in all_of(searcher, ["a dog", "a frisbee"], min_score=0.5, candidates=2)] == ["/p/a.jpg"]
    assert [m.path for m in all_of(searcher, ["a dog", "a frisbee"], min_score=0.5, candidates=7)] == ["/p/a.jpg", "/p/c.jpg"]


def test_all_refuses_too_many_phrases(searcher: Searcher) -> None:
    with pytest.raises(QueryInputError, match="at most 8"):
        all_of(searcher, ["a dog"] * 50)


# One row per image -------------------------------------------------------------------------------
@pytest.mark.parametrize("k,per_image", [(2, 2), (3, 1), (10, 2)])
def test_group_by_image(searcher: Searcher, k: int, per_image: int) -> None:
    dog = TEXTS["a dog"]
    rows = {path: sorted(((pid(path, i), cos(v, dog)) for i, v in enumerate(vs)), key=lambda r: -r[1]) for path, vs in SCENE.items()}
    order = sorted(rows, key=lambda p: -rows[p][0][1])[:k]
    found = images(searcher, Ask(texts=["a dog"]), k=k, per_image=per_image)
    assert [m.path for m in found] == order
    for m in found:
        assert_hits(m.segments, rows[m.path][:per_image])
        assert m.score == pytest.approx(rows[m.path][0][1], abs=TOL)


# The segment under a point (--like-image FILE@X,Y) -----------------------------------------------
def test_segment_at_picks_the_smallest_mask_under_the_point_or_says_none_does() -> None:
    from use_search.query.forms import image_vector, parse_image_point, segment_at
    from use_search.types import Segment

    big = np.zeros((10, 20), bool)
    big[2:8, 2:18] = True
    small = np.zeros((10, 20), bool)
    small[4:6, 4:6] = True
    segs = [Segment(big, (2, 2, 16, 6), int(big.sum())), Segment(small, (4, 4, 2, 2), int(small.sum()))]
    assert segment_at(segs, 5, 5) is segs[1]
    assert segment_at(segs, 10, 3) is segs[0]
    with pytest.raises(QueryInputError, match="no segment covers pixel 0,0"):
        segment_at(segs, 0, 0)
    with pytest.raises(QueryInputError, match="outside the image"):
        segment_at(segs, 20, 0)
    with pytest.raises(QueryInputError, match="point 40,3 is outside the image \\(40×20 pixels\\)"):
        image_vector(np.zeros((10, 20, 3), np.uint8), None, None, (40, 3), original=(20, 40))
    assert parse_image_point("a@b.png@3,4") == ("a@b.png", (3, 4)) and parse_image_point("a.png") == ("a.png", None)
