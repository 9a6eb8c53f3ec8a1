"""What every command module of the CLI shares: the typer app, the consoles, the global options and
the settings they make, the store they name, and the untrained-models banner. Command modules import
this, never the package, so that the package can import them to register their commands (no import
circle)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from use_search.presets import PRESET_CHOICES, UNTRAINED_BANNER, preset_for

if TYPE_CHECKING:
    from use_search.config import Settings
    from use_search.store import VectorStore

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Search the segments of your photos by text (USE).")
out = Console()
err = Console(stderr=True)


class State:
    settings: "Settings" = None  # type: ignore[assignment]


state = State()


def store_label() -> str:
    s = state.settings
    if s.store.backend == "server":
        return f"{s.store.url} / {s.store.collection}"
    return f"{s.store_path} / {s.store.collection}"


def open_store(writable: bool = True) -> "VectorStore":
    from use_search.store import open_store as open_configured

    return open_configured(state.settings, writable=writable)


@app.callback()
def common(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help=f"Model preset: {', '.join(PRESET_CHOICES)} (default: auto = paper with CUDA, base without)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Embedded store folder."),
    server: Optional[str] = typer.Option(None, "--server", help="Qdrant server URL (instead of the embedded store)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Qdrant server API key (default: env USE_SEARCH_STORE__API_KEY)."),
    collection: Optional[str] = typer.Option(None, "--collection", help="Collection name."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: auto)."),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Trained USE checkpoint, the one model of every command (default: crop-CLIP baseline); "
        "an ensemble for segment / eval is --member PATH:WEIGHT after the command.",
    ),
    sam: Optional[str] = typer.Option(None, "--sam", help="SAM instead of the preset's: registry name, checkpoint file, or ARCH:FILE (e.g. vit_b:sam.pth)."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP instead of the preset's: registry name, checkpoint file, or ARCH:FILE (e.g. ViT-B-16:clip.pt)."),
    dinov2: Optional[str] = typer.Option(None, "--dinov2", help="DINOv2 (USE model) instead of the preset's: registry name, file, or ARCH:FILE."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", help="Where checkpoints are cached."),
    offline: bool = typer.Option(False, "--offline", help="Never download; fail if a checkpoint is missing."),
) -> None:
    from use_search.config import Settings  # pydantic-settings: not needed to print --help

    s = Settings()
    top = {k: v for k, v in dict(
        preset=preset, device=device, use_checkpoint=model, weights_dir=weights_dir, sam=sam, clip=clip, dinov2=dinov2,
    ).items() if v is not None}
    if offline:
        top["offline"] = True
    store_upd = {k: v for k, v in dict(path=store, url=server, api_key=api_key, collection=collection).items() if v is not None}
    if server:
        store_upd["backend"] = "server"
    if store_upd:
        top["store"] = s.store.model_copy(update=store_upd)
    state.settings = Settings.model_validate({**s.model_dump(), **top})


def banner(untrained: bool | None = None) -> None:
    """The untrained-models banner: for the embedder in use when known, else for the preset."""
    if untrained is None:
        untrained = preset_for(state.settings).untrained
    if untrained:
        err.print(Panel(Text(UNTRAINED_BANNER, style="bold"), title="untrained models", border_style="red"))
