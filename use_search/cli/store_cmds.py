"""``use-search stats`` and ``use-search store check | optimize | snapshot | restore``: what the store
holds, its integrity, index and backups."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from use_search.cli.shell import app, err, out, state
from use_search.cli.shell import open_store as _open_store
from use_search.cli.shell import store_label as _store_label

@app.command()
def stats() -> None:
    """Counts of images (by content and by path) and segments in the store."""
    with _open_store(writable=False) as store:
        out.print(f"store: {_store_label()}")
        out.print(
            f"images: {store.count_contents()}  paths: {store.count_images()}  segments: {store.count_segments()}  dim: {store.dim}"
        )


store_app = typer.Typer(no_args_is_help=True, help="Check, repair, back up and restore the store.")
app.add_typer(store_app, name="store")

SHOWN_PROBLEMS = 50  # problems listed one per line; the rest are counted


@store_app.command("check")
def check(
    repair: bool = typer.Option(False, "--repair", help="Drop the damaged points and re-index their images "
                                "(those whose file is still there)."),
) -> None:
    """Read every point: vector finite and of unit norm, payload decodes (mask of the image's size, box
    and area agree), image records and points agree. Exit 1 if anything is wrong (after --repair: if
    anything is still wrong)."""
    from use_search.store.check import check_store, group_by_kind, repair as repair_store

    with _open_store(writable=repair) as store:
        report = check_store(store)
        _print_report(report)
        if repair and not report.ok:
            from use_search.factory import Runtime

            rt = Runtime.from_settings(state.settings)
            indexer = rt.indexer(store)

            def reindex(paths: list[Path]) -> None:
                for p in paths:
                    indexer.index(p)

            fixed = repair_store(store, report, reindex)
            store.optimize()
            out.print(f"repair: dropped {fixed.dropped_points} points, re-indexed {len(fixed.reindexed)} images")
            for p in fixed.gone:
                out.print(f"[yellow]gone[/] {escape(p)}: its file no longer exists: its record and points were dropped", highlight=False)
            report = check_store(store)
            _print_report(report)
    if not report.ok:
        kinds = ", ".join(f"{n} {k}" for k, n in group_by_kind(report.problems).items())
        err.print(f"{len(report.problems)} problem(s): {kinds}."
                  + ("" if repair else " `use-search store check --repair` re-indexes the damaged images."))
        raise typer.Exit(1)


def _print_report(report) -> None:  # type: ignore[no-untyped-def]
    out.print(f"store: {_store_label()}  ·  {report.images} images, {report.points} points checked")
    for p in report.problems[:SHOWN_PROBLEMS]:
        out.print(escape(p.line()), highlight=False, soft_wrap=True)
    if len(report.problems) > SHOWN_PROBLEMS:
        out.print(f"... and {len(report.problems) - SHOWN_PROBLEMS} more")
    if report.ok:
        out.print("[green]ok[/]: every point reads back sound and matches its image record")


@store_app.command("optimize")
def optimize() -> None:
    """Build the search index over every point not indexed yet (after adding in bulk, e.g. through the
    API or a script), in segments of at most store.max_segment_mb. `index` does this after each run."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with _open_store() as store:
        before = store.index_info()
        pending = before["points"] - before["indexed"]
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True) as progress:
            progress.add_task(f"indexing {pending:,} of {before['points']:,} points", total=None)
            store.optimize()
        after = store.index_info()
    out.print(
        f"{_store_label()}: {after['indexed']:,} of {after['points']:,} points indexed in {after['segments']} "
        f"segments (were {before['indexed']:,} in {before['segments']})"
    )


@store_app.command("snapshot")
def snapshot(out_file: Path = typer.Argument(..., help="The snapshot file to write (a .tar.gz).")) -> None:
    """Back up the store (both collections) to one file, while holding it (other commands are refused meanwhile)."""
    if out_file.exists():
        raise FileExistsError(f"{out_file} exists: give a new file name")
    with _open_store(writable=False) as store:
        store.snapshot(out_file)
    out.print(f"snapshot of {_store_label()} written to {out_file} ({out_file.stat().st_size / 2**20:,.1f} MB)")


@store_app.command("restore")
def restore(archive: Path = typer.Argument(..., help="A file written by `store snapshot`.")) -> None:
    """Restore a snapshot into the store folder (--store, --collection), which must not hold a store yet."""
    from use_search.store.base import StoreError

    s = state.settings
    if s.store.backend != "embedded":
        raise StoreError("store restore is not supported on the server backend: use Qdrant's own snapshot API")
    if not archive.is_file():
        raise FileNotFoundError(f"no such snapshot file: {archive}")
    from use_search.store.edge_snapshot import restore_snapshot

    manifest = restore_snapshot(archive, s.store_path, s.store.collection)
    out.print(f"restored {manifest['images']} images, {manifest['points']} points into {_store_label()}")
