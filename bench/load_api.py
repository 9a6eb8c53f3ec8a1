"""Load test of the HTTP API on 127.0.0.1: N concurrent clients POST /search for a bounded time.

    python bench/load_api.py --clients 50 --seconds 30 [--preset tiny]
    python bench/load_api.py --mixed --clients 4 --seconds 20 --rounds 2 [--heavy-side 4000]

Starts its own server (``use-search serve``, in a subprocess) on a temporary store with the sample
photos indexed, prints request count, status counts (5xx must be 0), throughput and p50/p95/p99
latency, stops the server.

``--mixed`` measures what a heavy client does to search: each round runs the search clients alone,
then the same clients next to one client that uploads ``--heavy-side``² JPEG photos to ``/segment``
in a loop; it prints search p50/p95/p99 for both phases (side by side, same server, same run), the
p95 ratio, and the heavy client's own figures.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from benchlib import free_port, machine, print_table, write_json

TEXTS = ["a cat", "a person", "a cup of coffee", "a rocket", "the sky", "a street", "car's license plate", "grass"]
HEAVY_PHOTOS = ["chelsea", "astronaut", "coffee", "rocket"]
HEAVY_CLASSES = "cat,person,cup,rocket,sky,grass,table,wall"


def heavy_images(side: int) -> list[bytes]:
    """Real photos (scikit-image, CC0) resized to side×side, as JPEG like a camera would send them."""
    import skimage.data
    from PIL import Image

    out = []
    for name in HEAVY_PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def search_client(url: str, deadline: float, lat: list[float], codes: Counter, i: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
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


async def heavy_client(url: str, deadline: float, images: list[bytes], lat: list[float], codes: Counter) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        n = 0
        while time.monotonic() < deadline:
            t = time.perf_counter()
            try:
                r = await c.post("/segment", data={"classes": HEAVY_CLASSES, "labels_format": "none"},
                                 files={"file": (f"big{n}.jpg", images[n % len(images)], "image/jpeg")})
                codes[r.status_code] += 1
            except httpx.HTTPError as e:
                codes[type(e).__name__] += 1
            lat.append(time.perf_counter() - t)
            n += 1


async def phase(url: str, clients: int, seconds: float, heavy: list[bytes] | None):  # type: ignore[no-untyped-def]
    lat: list[float] = []
    codes: Counter = Counter()
    hlat: list[float] = []
    hcodes: Counter = Counter()
    deadline = time.monotonic() + seconds
    jobs = [search_client(url, deadline, lat, codes, i) for i in range(clients)]
    if heavy is not None:
        jobs.append(heavy_client(url, deadline, heavy, hlat, hcodes))
    started = time.monotonic()
    await asyncio.gather(*jobs)
    return lat, codes, time.monotonic() - started, hlat, hcodes


def quantiles_ms(lat: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(sorted(lat), n=100) if len(lat) > 1 else [lat[0]] * 99
    return q[49] * 1000, q[94] * 1000, q[98] * 1000


def n5xx(codes: Counter) -> int:
    return sum(v for k, v in codes.items() if not isinstance(k, int) or k >= 500)


def start_server(tmp: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "use_search", "serve", "--port", str(port)], env=env,
        stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "server.log", "wb"),
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            break
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"server did not start:\n{(Path(tmp) / 'server.log').read_text()[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50, help="concurrent search clients")
    ap.add_argument("--seconds", type=float, default=30, help="length of each phase")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--mixed", action="store_true", help="search alone vs search + one heavy /segment client")
    ap.add_argument("--rounds", type=int, default=2, help="--mixed: alternating (search, search + heavy) rounds")
    ap.add_argument("--heavy-side", type=int, default=4000, help="--mixed: side of the uploaded square photos")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "USE_SEARCH_DATA_DIR": tmp, "USE_SEARCH_PRESET": args.preset,
               "USE_SEARCH_CONFIG": f"{tmp}/none.toml"}
        env.pop("USE_SEARCH_API_KEY", None)
        subprocess.run([sys.executable, str(repo / "scripts" / "sample_photos.py"), f"{tmp}/photos"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "use_search", "index", f"{tmp}/photos"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server, url = start_server(tmp, env)
        try:
            httpx.post(f"{url}/search", json={"text": "warm up", "k": 1}, timeout=300)
            if not args.mixed:
                lat, codes, wall, _, _ = asyncio.run(phase(url, args.clients, args.seconds, None))
                report_plain(args, lat, codes, wall)
                return
            images = heavy_images(args.heavy_side)
            # Start the worker (model loading) before measuring: a server does this once.
            r = httpx.post(f"{url}/segment", data={"classes": "a,b", "labels_format": "none"},
                           files={"file": ("warm.jpg", images[0], "image/jpeg")}, timeout=900)
            r.raise_for_status()
            report_mixed(args, url, images)
        finally:
            server.terminate()
            server.wait(timeout=60)


def report_plain(args: argparse.Namespace, lat: list[float], codes: Counter, wall: float) -> None:
    p50, p95, p99 = quantiles_ms(lat)
    five = n5xx(codes)
    print(f"clients={args.clients} seconds={args.seconds:.0f} preset={args.preset}")
    print(f"requests={len(lat)} throughput={len(lat) / wall:.1f} req/s statuses={dict(codes)} 5xx={five}")
    print(f"latency p50={p50:.1f} ms p95={p95:.1f} ms p99={p99:.1f} ms")
    sys.exit(1 if five else 0)


def report_mixed(args: argparse.Namespace, url: str, images: list[bytes]) -> None:
    alone: list[float] = []
    mixed: list[float] = []
    codes: Counter = Counter()
    hlat: list[float] = []
    hcodes: Counter = Counter()
    for _ in range(args.rounds):
        lat, c, _, _, _ = asyncio.run(phase(url, args.clients, args.seconds, None))
        alone += lat
        codes += c
        lat, c, _, hl, hc = asyncio.run(phase(url, args.clients, args.seconds, images))
        mixed += lat
        codes += c
        hlat += hl
        hcodes += hc
    a, m = quantiles_ms(alone), quantiles_ms(mixed)
    rows = [
        {"phase": "search only", "requests": len(alone), "p50_ms": a[0], "p95_ms": a[1], "p99_ms": a[2]},
        {"phase": f"search + /segment {args.heavy_side}²", "requests": len(mixed), "p50_ms": m[0], "p95_ms": m[1],
         "p99_ms": m[2]},
    ]
    print(f"clients={args.clients} seconds={args.seconds:.0f}×{args.rounds} rounds preset={args.preset}")
    print_table("search latency, alone and next to one heavy client", rows)
    heavy_mean = statistics.mean(hlat) if hlat else float("nan")
    print(f"\np95 ratio (with heavy / alone): {m[1] / a[1]:.2f}   p50 ratio: {m[0] / a[0]:.2f}")
    print(f"heavy client: {len(hlat)} /segment requests, statuses {dict(hcodes)}, mean {heavy_mean:.1f} s")
    print(f"search statuses {dict(codes)}")
    five = n5xx(codes) + n5xx(hcodes)
    write_json(args.json, {
        "bench": "load_api_mixed", "machine": machine(), "clients": args.clients, "seconds": args.seconds,
        "rounds": args.rounds, "preset": args.preset, "heavy_side": args.heavy_side, "rows": rows,
        "p95_ratio": m[1] / a[1], "heavy_requests": len(hlat), "heavy_mean_s": heavy_mean,
        "heavy_statuses": {str(k): v for k, v in hcodes.items()}, "search_statuses": {str(k): v for k, v in codes.items()},
    })
    sys.exit(1 if five else 0)


if __name__ == "__main__":
    main()
