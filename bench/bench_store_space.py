"""What the embedded store really writes to disk: creating it, a first write, each later open.

    python bench/bench_store_space.py            # needs root: mounts a tmpfs and a loop ext4 image

For each file system (a 300 MB tmpfs; a 300 MB ext4 image file, loop-mounted) it creates a store in an
empty folder, writes 100 images × 20 segments of 512-d points with indexer-shaped payloads, closes it
(the writer's close fills, on tmpfs, what the next load would), then opens it three times as a reader
and once as a writer. Reported: the file system's used-space change (``statvfs``) at each step, in KB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import print_table  # noqa: E402

from use_search.masks import encode_rle, mask_bbox  # noqa: E402
from use_search.store import EdgeStore, ImageEntry, segment_payload  # noqa: E402
from use_search.types import SegmentPoint, point_id  # noqa: E402

DIM, IMAGES, SEGMENTS = 512, 100, 20


def used_kb(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def points_and_records(rng: np.random.Generator) -> tuple[list[SegmentPoint], list[ImageEntry]]:
    points, records = [], []
    for i in range(IMAGES):
        sha = f"{i:064x}"
        for j in range(SEGMENTS):
            mask = np.zeros((192, 256), bool)
            mask[j : j + 40, 2 * j : 2 * j + 60] = True
            payload = segment_payload(
                path=f"/photos/{i}.jpg", sha256=sha, width=256, height=192, segment_index=j, n_segments=SEGMENTS,
                rle=encode_rle(mask), bbox=mask_bbox(mask), area=int(mask.sum()), predicted_iou=0.9,
                stability_score=0.95, source="auto", model="bench", indexed_at="2024-01-01T00:00:00+00:00",
            )
            points.append(SegmentPoint(point_id(sha, j), rng.normal(size=DIM).astype(np.float32), payload))
        records.append(ImageEntry(f"/photos/{i}.jpg", sha, 256, 192, SEGMENTS, "bench", "2024-01-01T00:00:00+00:00"))
    return points, records


def measure(mnt: Path) -> dict[str, int]:
    store, out = mnt / "store", {}
    points, records = points_and_records(np.random.default_rng(0))
    before = used_kb(mnt)
    s = EdgeStore(store, "segments")
    s.ensure(DIM)
    out["create"] = used_kb(mnt) - before
    before = used_kb(mnt)
    s.upsert_segments(points)
    s.put_images(records)
    s.optimize()
    out[f"write {len(points)} points + optimize"] = used_kb(mnt) - before
    before = used_kb(mnt)
    s.close()
    out["writer's close"] = used_kb(mnt) - before
    for n in (1, 2, 3):
        before = used_kb(mnt)
        with EdgeStore(store, "segments", writable=False) as r:
            r.count_segments()
            r.search(points[0].vector, 10)
        out[f"reader open #{n}"] = used_kb(mnt) - before
    before = used_kb(mnt)
    EdgeStore(store, "segments").close()
    out["writer open"] = used_kb(mnt) - before
    out["store total"] = used_kb(mnt)
    return out


def mount(kind: str, mnt: Path, work: Path) -> None:
    if kind == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mnt)]
    else:
        image = work / "ext4.img"
        with open(image, "wb") as f:
            f.truncate(300 * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        cmd = ["mount", "-o", "loop", str(image), str(mnt)]
    subprocess.run(cmd, check=True)


def main() -> None:
    results = {}
    for kind in ("tmpfs", "ext4"):
        with tempfile.TemporaryDirectory() as work:
            mnt = Path(work) / "mnt"
            mnt.mkdir()
            mount(kind, mnt, Path(work))
            try:
                results[kind] = measure(mnt)
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
    steps = list(results["tmpfs"])
    print_table("used space change per step, KB", [{"step": k, **{fs: r[k] for fs, r in results.items()}} for k in steps])


if __name__ == "__main__":
    main()
