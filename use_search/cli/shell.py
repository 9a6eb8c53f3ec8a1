"""What every command module of the CLI shares: the typer app, the consoles, the settings the global
options made, and the store they name. Command modules import this, never the package, so that the
package can import them to register their commands (no import circle)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console

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
