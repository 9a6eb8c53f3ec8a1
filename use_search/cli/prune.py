"""``use-search prune``: drop the references of files that no longer exist, across the whole store."""

from __future__ import annotations

import typer
from rich.markup import escape

from use_search.cli.shell import app, err, out
from use_search.cli.shell import open_store as _open_store
from use_search.cli.shell import store_label as _store_label


@app.command()
def prune(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be dropped."),
) -> None:
    """Drop every indexed path whose file no longer exists (moved, renamed or deleted), across the store.
    A content's segments go with its last path; segments still referred to by another path stay."""
    from use_search.indexer.prune import prune_store

    with _open_store() as store:
        pruned = prune_store(store, dry_run=dry_run)
    for path in pruned.records:
        out.print(f"{'would drop' if dry_run else 'dropped'} {escape(path)}", highlight=False, soft_wrap=True)
    for path in pruned.orphans:
        out.print(f"{'would drop' if dry_run else 'dropped'} {escape(path)} (a reference without a record)",
                  highlight=False, soft_wrap=True)
    verb = "would drop" if dry_run else "dropped"
    err.print(f"store: {_store_label()}  ·  {verb} {len(pruned.records)} path(s) whose file is gone, "
              f"{len(pruned.orphans)} orphan reference(s)" + ("" if dry_run else f", {pruned.segments} segment(s)"))
