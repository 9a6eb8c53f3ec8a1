"""Indexing throughput of the real ``Indexer.index`` path: images/s end to end, and the busy time of
each stage (decode, masks, embed, write).

    python bench/bench_index.py --preset tiny --embedder crop-clip --images 8 --rounds 2
    python bench/bench_index.py --preset base --embedder use --images 2 --points-per-side 16   # CPU
    python bench/bench_index.py --preset paper --device cuda --embedder use --images 64 --mode pipelined

The parts are built as the CLI builds them: ``Runtime.from_settings(settings)`` → ``rt.indexer(store)``,
i.e. the segmenter of ``load_auto_segmenter`` (``amg.engine``: the batched engine by default), the
embedder of ``load_embedder`` (crop-CLIP, or USE with ``--embedder use`` from a USE checkpoint that
``init_use_checkpoint`` writes for the preset), and an embedded store in a scratch folder. For base
and paper, random-init checkpoints of the real architectures are first written in the official file
layouts into a scratch weights folder (``benchlib.write_random_checkpoints``), so the same loading
code runs with the real FLOPs (docs/design.md: speed is measured with random weights).

Random weights make SAM's score filters keep few or no masks. The segmenter still runs in full (its
time is the masks stage), but by default what it returns is replaced by ``--masks`` fixed masks per
image (deterministic shapes, with their RLE), so that embed and write see a realistic, equal load
(docs/design.md: mask-count-dependent stages use a fixed mask set); ``--masks 0`` passes SAM's own output.

Stage split: the segmenter, the embedder and the store are wrapped in timers that add up the seconds
spent in their calls (``segment``/``segment_batch``; ``embed_segments``/``embed_batch``;
``upsert_segments``/``put_image``); decode (``read_image``: file → RGB + sha256) is timed on the same
files apart, before the run. In a pipelined runner the stages overlap, so their busy times add up to
more than the wall time; images/s is the wall time of ``Indexer.index`` over ``--images`` new files
(after a warm-up ``index`` of ``--warmup`` other files into the same store).

``--mode both`` (the default) runs the sequential reference runner and the pipelined one
(``settings.index_pipeline``) in turns, ``--rounds`` times, each run on a store and files of its
own with the same loaded models, and prints pipelined / sequential images/s per round.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    fixed_masks, machine, peak_rss_mb, photos, print_table, rss_mb, sync, write_json, write_random_checkpoints,
)

from use_search.config import Settings, StoreSettings  # noqa: E402
from use_search.factory import Runtime  # noqa: E402
from use_search.indexer.read import read_image  # noqa: E402

SCRATCH_MARK = "RANDOM-WEIGHTS-FOR-BENCHMARKS"


class StageTimer:
    """Seconds spent in the named methods of a wrapped part, per stage; everything else passes through."""

    def __init__(self, inner: Any, stage: str, methods: tuple[str, ...], busy: dict[str, float], device: str) -> None:
        self._inner, self._stage, self._methods, self._busy, self._device = inner, stage, methods, busy, device

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in self._methods or not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return self._after(name, args, attr(*args, **kwargs))
            finally:
                sync(self._device)
                self._busy[self._stage] = self._busy.get(self._stage, 0.0) + time.perf_counter() - t0

        return timed

    def _after(self, name: str, args: tuple, out: Any) -> Any:
        return out


class FixedMaskSegmenter(StageTimer):
    """The real segmenter, timed; its output replaced by ``n`` fixed masks per image (see the module
    docstring). The masks of a shape are built once, outside the timed call."""

    def __init__(self, inner: Any, n: int, busy: dict[str, float], device: str, counts: list[int]) -> None:
        super().__init__(inner, "masks", ("segment", "segment_batch"), busy, device)
        self._n, self._cache, self._counts = n, {}, counts

    def _fixed(self, image: np.ndarray) -> list:
        shape = image.shape[:2]
        if shape not in self._cache:
            self._cache[shape] = fixed_masks(self._n, *shape, seed=len(self._cache))
        return list(self._cache[shape])

    def __getattr__(self, name: str) -> Any:
        attr = super().__getattr__(name)
        if name not in self._methods:
            return attr

        def replaced(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            if name == "segment":
                self._counts.append(len(out))
                return self._fixed(args[0]) if self._n else out
            self._counts.extend(len(o) for o in out)
            return [self._fixed(im) for im in args[0]] if self._n else out

        return replaced


def write_images(folder: Path, n: int, side: int, offset: int) -> list[Path]:
    """``n`` distinct JPEG files from the real photos (one pixel changed per copy: no duplicates)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = photos(side)
    out = []
    for i in range(n):
        rgb = base[i % len(base)].copy()
        j = offset + i
        rgb[0, 0] = (j % 256, (j // 256) % 256, 128)
        path = folder / f"img{j:05d}.jpg"
        Image.fromarray(rgb).save(path, quality=90)
        out.append(path)
    return out


def scratch_weights(folder: Path | None, tmp: Path) -> Path:
    """A folder for random checkpoints: new, or one this script marked before (never a real cache)."""
    folder = folder or tmp / "weights"
    if folder.exists() and any(folder.iterdir()) and not (folder / SCRATCH_MARK).exists():
        raise SystemExit(f"{folder} holds files this script did not write; give an empty or new --scratch-weights folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCRATCH_MARK).write_text("random-init checkpoints written by bench/bench_index.py: not real weights\n")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "base", "paper"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--embedder", default="crop-clip", choices=["crop-clip", "use"])
    ap.add_argument("--mode", default="both", choices=["pipelined", "sequential", "both"],
                    help="the runner (settings.index_pipeline); both: sequential and pipelined in turns, each on its own store and files")
    ap.add_argument("--rounds", type=int, default=1, help="with --mode both: sequential + pipelined runs per round")
    ap.add_argument("--images", type=int, default=8, help="new images indexed per timed run")
    ap.add_argument("--warmup", type=int, default=1, help="images indexed first into each store (not timed)")
    ap.add_argument("--side", type=int, default=640, help="longest side of the test photos (COCO-like: 640)")
    ap.add_argument("--masks", type=int, default=100, help="fixed masks per image for embed/write; 0 = SAM's own")
    ap.add_argument("--points-per-side", type=int, help="override the preset's point grid")
    ap.add_argument("--engine", choices=["batched", "reference"], help="amg.engine (default: the settings' default)")
    ap.add_argument("--keep-all-masks", action="store_true", help="SAM score thresholds 0: every grid mask is post-processed")
    ap.add_argument("--scratch-weights", type=Path, help="keep the random checkpoints here between runs")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ["sequential", "pipelined"] * args.rounds if args.mode == "both" else [args.mode]

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp_name:
        tmp = Path(tmp_name)
        amg: dict[str, Any] = {}
        if args.points_per_side:
            amg["points_per_side"] = args.points_per_side
        if args.engine:
            amg["engine"] = args.engine
        if args.keep_all_masks:
            amg.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
        settings = Settings(
            data_dir=tmp / "data", weights_dir=scratch_weights(args.scratch_weights, tmp), preset=args.preset,
            device=args.device, offline=True, store=StoreSettings(path=tmp / "store"),
        )
        settings = settings.model_copy(update={"amg": settings.amg.model_copy(update=amg)})
        t0 = time.perf_counter()
        write_random_checkpoints(args.preset, settings)
        if args.embedder == "use":
            from use_search.model.use import init_use_checkpoint

            ckpt = init_use_checkpoint(args.preset, settings, tmp / f"use-{args.preset}-random.safetensors")
            settings = settings.model_copy(update={"use_checkpoint": ckpt})
        prepare_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        rt = Runtime.from_settings(settings)
        busy: dict[str, float] = {}
        sam_counts: list[int] = []
        parts: dict[str, Any] = {}

        # Runtime.indexer builds its parts through these two methods: load once, wrap in timers.
        def segmenter() -> Any:
            if "segmenter" not in parts:
                parts["segmenter"] = Runtime.segmenter(rt)
                parts["timed segmenter"] = FixedMaskSegmenter(parts["segmenter"], args.masks, busy, rt.device, sam_counts)
            return parts["timed segmenter"]

        def embedder() -> Any:
            if "embedder" not in parts:
                parts["embedder"] = Runtime.embedder(rt)
                parts["timed embedder"] = StageTimer(parts["embedder"], "embed", ("embed_segments", "embed_batch"), busy, rt.device)
            return parts["timed embedder"]

        rt.segmenter, rt.embedder = segmenter, embedder  # type: ignore[method-assign]
        segmenter(), embedder()
        load_s = time.perf_counter() - t0
        rss_models = rss_mb()

        runs = []
        for run_no, mode in enumerate(modes):
            folder = tmp / f"run{run_no}"
            rt.settings = settings.model_copy(update={
                "index_pipeline": mode == "pipelined", "store": StoreSettings(path=folder / "store"),
            })
            warm = write_images(folder / "warmup", args.warmup, args.side, offset=100_000 * (run_no + 1))
            files = write_images(folder / "photos", args.images, args.side, offset=1000 * run_no)
            t0 = time.perf_counter()
            for path in files:
                read_image(path, settings.max_image_pixels)
            decode_s = time.perf_counter() - t0
            store = rt.store()
            indexer = rt.indexer(StageTimer(store, "write", ("upsert_segments", "put_image"), busy, rt.device))
            if warm:
                indexer.index(folder / "warmup")
            busy.clear()
            sam_counts.clear()
            rss_trace: list[float] = []
            if str(rt.device).startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            report = indexer.index(folder / "photos", on_image=lambda event: rss_trace.append(rss_mb()))
            wall = time.perf_counter() - t0
            n_points = store.count_segments()
            store.close()
            if report.failed or report.indexed != args.images:
                raise SystemExit(f"{mode}: indexed {report.indexed} of {args.images}; failed: {report.failed}")
            n = args.images
            stage_ms = {"decode (apart)": 1000 * decode_s / n, **{k: 1000 * v / n for k, v in busy.items()}}
            # The rest of the wall time: the runner's own work (decode + hash inside it, payloads...);
            # negative when the stages overlap (pipelined runner).
            stage_ms["wall − masks − embed − write"] = 1000 * wall / n - sum(busy.values()) * 1000 / n
            runs.append({
                "mode": mode, "images_per_s": n / wall, "wall_s": wall, "stage_ms_per_image": stage_ms,
                "busy_over_wall": sum(busy.values()) / wall, "points": n_points, "segments_reported": report.segments,
                "image_batch": indexer.image_batch, "decode_threads": indexer.decode_threads,
                "sam_masks_per_image": float(np.mean(sam_counts)) if sam_counts else 0.0,
                "rss_first_mb": rss_trace[0] if rss_trace else None, "rss_last_mb": rss_trace[-1] if rss_trace else None,
                "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if str(rt.device).startswith("cuda") else None,
            })

    segmenter_name, embedder_name = type(parts["segmenter"]).__name__, type(parts["embedder"]).__name__
    result = {
        "bench": "index", "preset": args.preset, "device": str(rt.device), "segmenter": segmenter_name,
        "embedder": embedder_name, "embedder_id": parts["embedder"].model_id, "images": args.images, "side": args.side,
        "points_per_side": settings.amg.points_per_side or rt.preset.points_per_side,
        "masks_per_image_embedded": args.masks if args.masks else None, "runs": runs,
        "prepare_s": prepare_s, "load_s": load_s, "rss_after_models_mb": rss_models, "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }
    for r in runs:
        wall_ms = 1000 * r["wall_s"] / args.images
        print_table(
            f"Indexer.index, {r['mode']} runner, preset {args.preset} ({segmenter_name} + {embedder_name}, random weights) "
            f"on {rt.device}, {args.masks or 'SAM'} masks/image embedded: {r['images_per_s']:.3g} images/s over {args.images} images",
            [{"stage": k, "busy ms/image": v, "share of wall %": 100 * v / wall_ms} for k, v in r["stage_ms_per_image"].items()],
        )
    summary = [{
        "runner": r["mode"], "images/s": r["images_per_s"], "wall s": r["wall_s"], "image batch": r["image_batch"],
        "busy / wall": r["busy_over_wall"], "SAM masks/img": r["sam_masks_per_image"], "points": r["points"],
        "RSS first→last MB": f"{r['rss_first_mb']:.0f}→{r['rss_last_mb']:.0f}" if r["rss_first_mb"] else "-",
        "GPU peak MB": r["gpu_peak_mb"],
    } for r in runs]
    print_table(f"summary (peak RSS {result['peak_rss_mb']:.0f} MB)", summary)
    by_mode = {m: [r["images_per_s"] for r in runs if r["mode"] == m] for m in ("sequential", "pipelined")}
    if by_mode["sequential"] and by_mode["pipelined"]:
        ratios = [p / s for s, p in zip(by_mode["sequential"], by_mode["pipelined"])]
        result["pipelined_over_sequential"] = ratios
        print(f"\npipelined / sequential images/s, per round: {', '.join(f'{x:.2f}' for x in ratios)}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
