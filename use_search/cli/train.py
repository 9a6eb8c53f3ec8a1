"""``use-search train`` and ``use-search model init``: the USE head (paper §3.2, §4.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from use_search.cli.shell import app, banner, err, state
from use_search.presets import preset_for, resolve

model_app = typer.Typer(no_args_is_help=True, help="USE model checkpoints.")
app.add_typer(model_app, name="model")


@app.command()
def train(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Checkpoints, train_state.pt and metrics.jsonl go here."),
    coco: Optional[list[Path]] = typer.Option(
        None, "--coco",
        help="COCO annotation JSON (category names as texts); repeat it for more files of the same images, "
        "e.g. instances + COCO-Stuff: segments merge by image id.",
    ),
    coco_images: Optional[Path] = typer.Option(None, "--coco-images", help="Image folder of --coco."),
    coco_captions: Optional[Path] = typer.Option(None, "--coco-captions", help="COCO captions JSON of --coco."),
    shards: Optional[list[Path]] = typer.Option(None, "--shards", help="Pair shards written by `curate run`."),
    folder: Optional[list[Path]] = typer.Option(None, "--folder", help="Images with per-image JSON pairs."),
    val_shards: Optional[list[Path]] = typer.Option(None, "--val-shards", help="Held-out pair shards for recall@k."),
    val_fraction: float = typer.Option(0.0, "--val-fraction", help="Without --val-*: hold out this share of images."),
    epochs: int = typer.Option(5, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per step; all their segments enter the loss."),
    lr: float = typer.Option(1e-3, "--lr"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (smoke runs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/train_state.pt."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random resize 0.5–2 and crop (§4.2)."),
    feature_cache: Optional[Path] = typer.Option(None, "--feature-cache", help="Cache frozen features here (needs --no-augment)."),
    workers: int = typer.Option(4, "--workers"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train the USE head (LLNs, block scales, projection) on segment-text pairs (paper §3.2, §4.2).

    Multi-GPU: torchrun --nproc-per-node N -m use_search train ...
    """
    from use_search.train import DataSpec, TrainConfig, run

    specs = [DataSpec("coco", coco[0], images=coco_images, captions=coco_captions, extra_annotations=tuple(coco[1:]))] if coco else []
    specs += [DataSpec("shards", p) for p in shards or []] + [DataSpec("folder", p) for p in folder or []]
    if not specs:
        raise ValueError("no training data: give --coco, --shards or --folder")
    banner()
    cfg = TrainConfig(
        train=specs, out_dir=out_dir, preset=resolve(state.settings),
        val=[DataSpec("shards", p) for p in val_shards or []], val_fraction=val_fraction, epochs=epochs,
        batch_size=batch_size, lr=lr, max_steps=max_steps, resume=resume, augment=augment,
        feature_cache=feature_cache, workers=workers, seed=seed,
    )
    result = run(cfg, state.settings)
    for ev in result.evals[-1:]:
        err.print("held-out " + "  ".join(f"{k}={v:.3f}" for k, v in ev.items() if isinstance(v, float)))
    err.print(f"{result.step} steps; checkpoint: {result.checkpoint} (use it with --model)")


@model_app.command("init")
def model_init(out_path: Path = typer.Argument(..., help="Where to write the .safetensors checkpoint.")) -> None:
    """Write an untrained USE head for the preset's backbones (a starting point; not a trained model)."""
    from use_search.model.use import init_use_checkpoint

    preset = preset_for(state.settings)
    path = init_use_checkpoint(preset, state.settings, out_path)
    err.print(f"untrained USE checkpoint for preset '{preset.name}': {escape(str(path))}")

