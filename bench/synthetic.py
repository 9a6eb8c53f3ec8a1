"""The synthetic store of the store benchmarks (bench_query, bench_forms, bench_scale): clustered vectors
and the indexer's payloads, 100 segments per image in 100 folders. No torch: a benchmark that
measures its own memory must not load it by importing this."""

from __future__ import annotations

import numpy as np

from use_search.store import segment_payload
from use_search.types import SegmentPoint, point_id

# A COCO RLE of a typical SAM mask on a 640×480 photo is a few hundred characters.
RLE_COUNTS = "f]^16`>3M3N2N2N1O1O1N2O001O0O1000000O1O1O1N2N2N3L5K^Sk0" * 4
FIXED_RLE = {"size": [480, 640], "counts": RLE_COUNTS}
SEGMENTS_PER_IMAGE = 100
FOLDERS = 100  # 1% of the points per folder


class Mixture:
    """A Gaussian mixture of unit vectors around ``centres`` random unit centres (each with its own
    spread), so every query has a real neighbourhood; point i is a pure function of (seed, batch start, i)."""

    def __init__(self, centres: int, dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        c = rng.standard_normal((centres, dim)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.sigma = rng.uniform(0.4, 0.9, centres).astype(np.float32)
        self.dim, self.seed = dim, seed

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) unit vectors and their centre index."""
        which = rng.integers(0, len(self.centres), n)
        noise = rng.standard_normal((n, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        v = self.centres[which] + self.sigma[which, None] * noise
        return v / np.linalg.norm(v, axis=1, keepdims=True), which

    def points(self, start: int, n: int) -> np.ndarray:
        return self.sample(n, np.random.default_rng([self.seed, 1, start]))[0]

    def queries(self, n: int) -> np.ndarray:
        return self.sample(n, np.random.default_rng([self.seed, 2]))[0]


def folder_of(point_index: int) -> str:
    return f"/photos/f{(point_index // SEGMENTS_PER_IMAGE) % FOLDERS:02d}"


def make_points(start: int, vectors: np.ndarray, rles: list[dict] | None = None) -> list[SegmentPoint]:
    """Points ``start``, ``start + 1``, ... with the indexer's payload; masks cycle through ``rles``
    (default: one fixed RLE)."""
    rles = rles or [FIXED_RLE]
    out = []
    for j, vec in enumerate(vectors):
        i = start + j
        img, seg = divmod(i, SEGMENTS_PER_IMAGE)
        sha = f"{img:064x}"
        payload = segment_payload(
            paths=[f"{folder_of(i)}/img{img:07d}.jpg"], sha256=sha, width=640, height=480, segment_index=seg,
            n_segments=SEGMENTS_PER_IMAGE, rle=rles[i % len(rles)], bbox=(10, 20, 200, 150), area=12345,
            predicted_iou=0.9, stability_score=0.95, source="auto", model="bench",
            indexed_at="2026-01-01T00:00:00+00:00",
        )
        out.append(SegmentPoint(point_id(sha, seg), vec, payload))
    return out
