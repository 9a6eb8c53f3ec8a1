"""Run ``use-search serve`` as a real process on 127.0.0.1 for the HTTP tests."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx


def photo_bytes(name: str = "coffee", side: int = 128, fmt: str = "PNG") -> bytes:
    """A scikit-image photo, shrunk to ``side`` (the tiny SAM on a shared CPU), encoded as ``fmt``."""
    import io

    import skimage.data
    from PIL import Image

    img = Image.fromarray(getattr(skimage.data, name)())
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format=fmt)
    return buf.getvalue()

STARTUP_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def api_server(root: Path, nofile: int | None = None, **env_extra: str) -> Iterator[str]:
    """Start the server (tiny preset, store under ``root/data``), wait for /health, yield its URL, stop it.
    Its process id is in ``root/server.pid`` while it runs. ``nofile``: its limit of open file handles."""
    port = free_port()
    env = {
        **os.environ, "USE_SEARCH_DATA_DIR": str(root / "data"), "USE_SEARCH_PRESET": "tiny",
        "USE_SEARCH_DEVICE": "cpu", "USE_SEARCH_OFFLINE": "1", "USE_SEARCH_CONFIG": str(root / "none.toml"),
        "OMP_NUM_THREADS": "1", **env_extra,
    }
    if "USE_SEARCH_API_KEY" not in env_extra:
        env.pop("USE_SEARCH_API_KEY", None)
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "use_search", "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
        )
        (root / "server.pid").write_text(str(proc.pid))
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + STARTUP_S
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
