"""Load test of the HTTP API on 127.0.0.1: N concurrent clients POST /search for a bounded time.

    python bench/load_api.py --clients 50 --seconds 30 [--preset tiny]

Starts its own server (uvicorn, in a subprocess) on a temporary store with the sample photos indexed,
prints request count, status counts (5xx must be 0), throughput and p50/p95/p99 latency, stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

TEXTS = ["a cat", "a person", "a cup of coffee", "a rocket", "the sky", "a street", "car's license plate", "grass"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client(url: str, deadline: float, lat: list[float], codes: Counter, i: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        n = i
        while time.monotonic() < deadline:
            t = time.perf_counter()
            try:
                r = await c.post("/search", json={"text": TEXTS[n % len(TEXTS)], "k": 10})
                codes[r.status_code] += 1
            except httpx.HTTPError as e:
                codes[type(e).__name__] += 1
            lat.append(time.perf_counter() - t)
            n += 1


async def load(url: str, clients: int, seconds: float) -> tuple[list[float], Counter]:
    lat: list[float] = []
    codes: Counter = Counter()
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client(url, deadline, lat, codes, i) for i in range(clients)))
    return lat, codes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "USE_SEARCH_DATA_DIR": tmp, "USE_SEARCH_PRESET": args.preset}
        subprocess.run([sys.executable, str(repo / "scripts" / "sample_photos.py"), f"{tmp}/photos"], check=True, env=env)
        subprocess.run([sys.executable, "-m", "use_search", "index", f"{tmp}/photos"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "use_search", "serve", "--port", str(port)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            httpx.post(f"{url}/search", json={"text": "warm up", "k": 1}, timeout=120)
            started = time.monotonic()
            lat, codes = asyncio.run(load(url, args.clients, args.seconds))
            wall = time.monotonic() - started
        finally:
            server.terminate()
            server.wait(timeout=30)
    q = statistics.quantiles(sorted(lat), n=100)
    five = sum(v for k, v in codes.items() if isinstance(k, int) and k >= 500)
    print(f"clients={args.clients} seconds={args.seconds:.0f} preset={args.preset}")
    print(f"requests={len(lat)} throughput={len(lat) / wall:.1f} req/s statuses={dict(codes)} 5xx={five}")
    print(f"latency p50={q[49] * 1000:.1f} ms p95={q[94] * 1000:.1f} ms p99={q[98] * 1000:.1f} ms")
    sys.exit(1 if five else 0)


if __name__ == "__main__":
    main()
