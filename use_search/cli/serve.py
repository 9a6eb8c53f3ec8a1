"""``use-search serve``: the HTTP API and web page over the store."""

from __future__ import annotations

import typer
from rich.panel import Panel
from rich.text import Text

from use_search.cli.shell import app, banner, err, state
from use_search.cli.shell import open_store as _open_store


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
) -> None:
    """HTTP API + web page over the store. This process owns the embedded store while it runs; on a store
    it cannot write (a read-only mount, no permission) it serves search only and refuses uploads."""
    from use_search.api import serve as run_server
    from use_search.api.app import exposure_warning
    from use_search.factory import Runtime

    # held by `index`, damaged...: one line now, not a traceback from the server's start-up
    with _open_store(writable=Runtime.from_settings(state.settings).store_writable()):
        pass
    banner()
    warning = exposure_warning(host, state.settings)
    if warning:
        err.print(Panel(Text(warning, style="bold"), title="no API key", border_style="red"))
    run_server(state.settings, host, port)
