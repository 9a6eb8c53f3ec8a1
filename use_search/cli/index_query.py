"""``use-search index``: fill the store from a folder (``query`` is in ``cli/query.py``)."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from use_search.cli.shell import app, banner, err, state
from use_search.cli.shell import store_label as _store_label


class RateColumn(ProgressColumn):
    """Images per second over the whole run (rich's own speed is a short window, and images land in
    batches, so its figure jumps); below one image a second also seconds per image, and the time
    left at that pace once the total is known."""

    def render(self, task) -> Text:  # type: ignore[override]
        elapsed = task.finished_time or task.elapsed
        if not elapsed or not task.completed:
            return Text("-- img/s", style="cyan")
        rate = task.completed / elapsed
        text = f"{rate:.2f} img/s" + (f" · {1 / rate:.1f} s/img" if rate < 1 else "")
        if task.total is not None and not task.finished:
            left = int((task.total - task.completed) / rate)
            text += f" · ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        return Text(text, style="cyan")


EXIT_SOME_FAILED = 3  # `index`: some files failed (reported), every other file is indexed


@app.command(
    epilog=f"Exit codes: 0 every file indexed or skipped; {EXIT_SOME_FAILED} some files failed (each is "
    "reported with its reason) and the rest were indexed; 2 a usage or setup error (nothing indexed, "
    "or the run stopped, e.g. the disk is full: what was written is kept); 130 / 143 interrupted by Ctrl-C / "
    "SIGTERM (the completed images are saved and counted)."
)
def index(
    folder: Path = typer.Argument(..., help="Folder of images (searched recursively) or one image."),
    prune: bool = typer.Option(
        False, "--prune", help="Also drop the references of files under FOLDER that are gone (FOLDER itself may be "
        "gone: a moved or deleted folder); segments go with their content's last reference. `use-search prune` "
        "does the whole store.",
    ),
    force: bool = typer.Option(False, "--force", help="Re-index images even if already indexed."),
    verify: bool = typer.Option(
        False, "--verify", help="Hash every file, even those whose size and mtime match their record (a file "
        "rewritten with the same size and mtime is otherwise taken as unchanged)."
    ),
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS",
        help="Index on Ray: 'local' starts Ray on this machine (all its GPUs), 'auto' joins the running "
        "cluster, 'ray://HOST:10001' a remote one. See docs/deploy.md.",
    ),
    ray_actors: Optional[int] = typer.Option(None, "--ray-actors", help="With --ray: segment+embed actors (default: one per GPU)."),
) -> None:
    """Segment every image with SAM, embed every segment, upsert into the store. Incremental: a file
    whose size and mtime match its record is skipped without being read."""
    from use_search.factory import Runtime
    from use_search.store.base import StoreFullError

    rt = Runtime.from_settings(state.settings)
    if not folder.exists() and not prune:
        raise FileNotFoundError(f"no such file or folder: {folder} (add --prune to drop what was indexed there)")
    rt.preflight(("sam", "clip"))  # missing weights fail before the store is even created
    with rt.store() as store:
        if ray is not None:
            from use_search.factory import engine_parts
            from use_search.indexer.ray_runner import RayOptions, index_with_ray

            opts = RayOptions(address=ray, num_actors=ray_actors)
            banner()
            err.print(f"store: {_store_label()}  ·  Ray: {ray}  ·  models load in the Ray actors")

            def run(**kw):  # type: ignore[no-untyped-def]
                return index_with_ray(state.settings, store, folder, build_parts=engine_parts, options=opts, **kw)
        else:
            indexer = rt.indexer(store)  # the models load on the first file with new content
            banner()
            err.print(f"store: {_store_label()}  ·  preset: {rt.settings.preset}  ·  device: {rt.device}")

            def run(**kw):  # type: ignore[no-untyped-def]
                return indexer.index(folder, **kw)
        report = _with_progress(lambda **kw: run(prune=prune, force=force, verify=verify, **kw))
        try:
            store.optimize()  # incremental: indexes what this run added (see store/edge.py)
        except StoreFullError as e:  # everything is committed; new points are searched by exact scan
            err.print(f"[yellow]warning[/]: the search index was not updated: {escape(str(e))}", highlight=False)
    t = Table(title="index summary", show_header=False)
    for k, v in [
        ("indexed images", report.indexed), ("segments added", report.segments),
        ("already indexed (skipped)", report.skipped),
        ("known content under a new path (referenced, not segmented)", report.copies),
        ("files hashed / decoded", f"{report.hashed} / {report.decoded}"),
        ("failed", len(report.failed)), ("warnings", len(report.warnings)),
        ("pruned paths / segments / orphan references", f"{report.pruned_images} / {report.pruned_segments} / {report.pruned_orphans}"),
        ("time", f"{report.seconds:.1f} s"), ("speed", f"{report.images_per_s:.2f} images/s"),
    ]:
        t.add_row(k, str(v))
    err.print(t)
    if report.failed:
        err.print(f"[yellow]{len(report.failed)} file(s) failed[/] (listed above); the rest is indexed. Exit code {EXIT_SOME_FAILED}.")
        raise typer.Exit(EXIT_SOME_FAILED)


def _with_progress(run):  # type: ignore[no-untyped-def]
    """``run(on_image=..., on_total=...)`` under a progress bar that lists failures and warnings as they
    come; on Ctrl-C or SIGTERM says what was saved and exits 130 / 143."""
    segs = saved = 0  # what this run committed (an image's event comes once it is written)
    with Progress(
        TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TextColumn("{task.fields[segments]} segments"), TimeElapsedColumn(), console=err,
    ) as bar:
        task = bar.add_task("index", total=None, segments=0)

        def on_total(n: int) -> None:
            bar.update(task, total=n)

        def on_image(ev) -> None:  # type: ignore[no-untyped-def]
            nonlocal segs, saved
            if ev.status == "indexed":
                segs += ev.segments
                saved += 1
            elif ev.status == "failed":
                bar.console.print(f"[yellow]{ev.status}[/] {escape(ev.path)}: {escape(ev.reason)}", highlight=False)
            for w in ev.warnings:
                bar.console.print(f"[yellow]warning[/] {escape(ev.path)}: {escape(w)}", highlight=False)
            bar.update(task, advance=1, segments=segs)

        with _interrupts() as stopped:
            try:
                report = run(on_image=on_image, on_total=on_total)
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see _interrupts); the caller closes the store
                bar.stop()
                err.print(
                    f"[yellow]interrupted[/]: {saved} completed images are saved ({segs} segments); "
                    "rerun the same command to finish.", highlight=False,
                )
                raise typer.Exit(stopped.exit_code) from None
    return report


class _Stop:
    exit_code = 130  # 128 + SIGINT; 143 after SIGTERM


@contextmanager
def _interrupts() -> Iterator[_Stop]:
    """SIGTERM stops the block as Ctrl-C does (a ``KeyboardInterrupt`` in the main thread), so one
    handler reports what was saved; ``exit_code`` says which signal it was."""
    stop = _Stop()

    def on_term(signum: int, frame: object) -> None:
        stop.exit_code = 128 + signum
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
