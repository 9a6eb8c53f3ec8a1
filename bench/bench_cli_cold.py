"""Cold-process CLI times: `use-search query` and `--help` as a user runs them (a fresh interpreter
each time), side by side with `python -c "import torch, open_clip"` on the same machine, and with an
older checkout of the code for comparison (`--old /work/base`).

Rows, each timed `--runs` times in alternating order (one warm-up round first, discarded), medians:
  import torch                  python -c "import torch"
  import torch, open_clip       the floor for a cold query (goal: query <= 2x this)
  query tiny (new|old)          --preset tiny query "a dog": the tiny CLIP, a 64-d store
  query base (new|old)          --preset base query "a dog": ViT-B/16's real-size towers with random
                                weights in the registry's cache file (OpenAI layout, fp16, ~300 MB), a
                                512-d store. Off with --no-base.
  --help (new|old)
  serve tiny (new|old)          `use-search --preset tiny serve` until /health answers, and until a
                                first POST /search (text tower + store) answers: the server's cold start

The stores are written through the store API (one segment per image, random vectors) with the model
id each preset's embedder records, so both code versions search them; query time does not depend on
how the vectors were made.

    python bench/bench_cli_cold.py --runs 5 --old /work/base [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402


def write_store(store_dir: Path, model: str, dim: int, images: int = 20) -> None:
    from use_search.indexer.read import LoadedImage
    from use_search.indexer.runner import now_iso, segment_points
    from use_search.masks import mask_bbox
    from use_search.store import EdgeStore
    from use_search.store.base import ImageEntry
    from use_search.types import ImageRecord, Segment

    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), bool)
    mask[8:40, 8:48] = True
    with EdgeStore(store_dir, "segments") as store:
        store.ensure(dim)
        for i in range(images):
            rec = ImageRecord(path=f"/photos/img{i:03d}.jpg", sha256=f"{i:064x}", width=64, height=64)
            vec = rng.normal(size=(1, dim)).astype(np.float32)
            vec /= np.linalg.norm(vec)
            seg = Segment(mask, mask_bbox(mask), int(mask.sum()))
            store.upsert_segments(segment_points(LoadedImage(rec, np.zeros((64, 64, 3), np.uint8)), [seg], vec, model))
            store.put_image(ImageEntry(rec.path, rec.sha256, 64, 64, 1, model, now_iso()))
        store.optimize()


def write_random_vit_b16(dest: Path) -> None:
    """ViT-B/16 with random weights, as an fp16 state dict (open_clip's key names, which are OpenAI's)."""
    import torch

    from use_search.model.clip import build_clip

    torch.manual_seed(0)
    model = build_clip("ViT-B-16")
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, dest)


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return elapsed


def timed_server(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """(seconds to /health, seconds to the first /search answer) of a fresh server process."""
    import httpx

    port = benchlib.free_port()
    t = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        health = time.perf_counter() - t
        r = httpx.post(url + "/search", json={"text": "a dog", "k": 5}, timeout=120)
        if r.status_code != 200:
            raise SystemExit(f"/search answered {r.status_code}: {r.text[:500]}")
        return health, time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--old", type=Path, default=None, help="checkout of older code to time side by side (PYTHONPATH)")
    ap.add_argument("--no-base", action="store_true", help="skip the ViT-B/16 (base preset) rows")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        tiny_data, base_data = Path(tmp) / "tiny", Path(tmp) / "base"
        write_store(tiny_data / "store", "crop-clip:clip-tiny-untrained", 64)
        if not args.no_base:
            write_store(base_data / "store", "crop-clip:clip_vit_b16_openai", 512)
            write_random_vit_b16(base_data / "weights" / "ViT-B-16.pt")

        def env(code: Path, data: Path) -> dict[str, str]:
            return {**os.environ, "PYTHONPATH": str(code), "USE_SEARCH_DATA_DIR": str(data),
                    "USE_SEARCH_CONFIG": "/nonexistent", "USE_SEARCH_OFFLINE": "1"}

        versions = {"new": REPO, **({"old": args.old.resolve()} if args.old else {})}
        # Run from a neutral folder: `python -m` puts the working directory before PYTHONPATH.
        for code in versions.values():
            where = subprocess.run([py, "-c", "import use_search; print(use_search.__file__)"], env=env(code, tiny_data),
                                   cwd=tmp, capture_output=True, text=True).stdout.strip()
            if not where.startswith(str(code)):
                raise SystemExit(f"PYTHONPATH={code} imports use_search from {where}")
        rows: dict[str, tuple[list[str], dict[str, str]]] = {
            "import torch": ([py, "-c", "import torch"], env(REPO, tiny_data)),
            "import torch, open_clip": ([py, "-c", "import torch, open_clip"], env(REPO, tiny_data)),
        }
        for v, code in versions.items():
            rows[f"query tiny ({v})"] = ([py, "-m", "use_search", "--preset", "tiny", "query", "a dog", "-k", "5"], env(code, tiny_data))
            if not args.no_base:
                rows[f"query base ({v})"] = ([py, "-m", "use_search", "--preset", "base", "query", "a dog", "-k", "5"], env(code, base_data))
            rows[f"--help ({v})"] = ([py, "-m", "use_search", "--help"], env(code, tiny_data))
            rows[f"serve tiny ({v})"] = ([py, "-m", "use_search", "--preset", "tiny", "serve"], env(code, tiny_data))

        samples: dict[str, list[float]] = {}
        for rnd in range(args.runs + 1):  # round 0 warms the page cache and is discarded
            for name, (cmd, e) in rows.items():
                if name.startswith("serve"):
                    health, search = timed_server(cmd, e, tmp)
                    got = {f"{name} → /health": health, f"{name} → first /search": search}
                else:
                    got = {name: timed(cmd, e, tmp)}
                for k, t in got.items():
                    if rnd:
                        samples.setdefault(k, []).append(t)
            print(f"round {rnd}/{args.runs} done", file=sys.stderr)

    floor = statistics.median(samples["import torch, open_clip"])
    table = [
        {"command": k, "median s": round(statistics.median(v), 2), "min s": round(min(v), 2),
         "max s": round(max(v), 2), "x import torch+open_clip": round(statistics.median(v) / floor, 2)}
        for k, v in samples.items()
    ]
    benchlib.print_table(f"cold CLI, {args.runs} alternating runs each (medians)", table)
    payload = {"machine": benchlib.machine(), "runs": args.runs, "rows": table,
               "samples_s": {k: [round(x, 3) for x in v] for k, v in samples.items()}}
    benchlib.write_json(args.json, payload)


if __name__ == "__main__":
    main()
