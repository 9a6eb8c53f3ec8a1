"""The point set of a 30-image library, indexed through the CLI with the tiny preset, is the one frozen
in tests/data/frozen_points.json.gz (tests/frozen_points.py builds both): the same ids, the same
payloads, vectors within 1e-6. Refactors of the indexing path (planning, decoding, working size, model
loading, writing) must leave it unchanged; a change that is meant to move it regenerates the copy in a
commit of its own that says why.

Float32: a vector is a unit-norm embedding and a mask score a value below 1, each made by a few thousand
float32 reductions, so two kernel sets agree to a few ulp of 1 (≈1e-7 each; ATen's portable kernels
against this machine's AVX-512 ones differ by at most 2.6e-7); 1e-6 leaves room for that and still
catches any change of input pixels, mask or model. Everything else in a payload is exact. The run is
repeated on ATen's portable kernels in CI (.ci/run)."""

from __future__ import annotations

import numpy as np

from frozen_points import build, load_frozen

SCORES = ("predicted_iou", "stability_score")  # network outputs: float32 rounding, like the vectors


def test_the_library_indexes_to_the_frozen_point_set(tmp_path):
    frozen = load_frozen()
    now = build(tmp_path)

    assert sorted(now) == sorted(frozen)
    for pid, want in frozen.items():
        got = now[pid]
        exact = {k: v for k, v in want["payload"].items() if k not in SCORES}
        assert {k: v for k, v in got["payload"].items() if k not in SCORES} == exact, pid
        for k in SCORES:
            assert abs(got["payload"][k] - want["payload"][k]) <= 1e-6, (pid, k)
        np.testing.assert_allclose(np.asarray(got["vector"]), np.asarray(want["vector"]), rtol=0, atol=1e-6, err_msg=pid)
