"""``use-search label``: every indexed image labelled with a class list by §4.3 voting over its stored
masks and vectors (no segmenter, no image decode), JSON lines out, per-class totals as a table."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import IO, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from use_search.cli.shell import app, banner, err, out, state
from use_search.cli.shell import open_store as _open_store
from use_search.cli.shell import store_label as _store_label


@app.command(
    epilog="Exit codes: 0 labels written; 2 a usage or setup error: no class, too many or repeated classes, an "
    "empty store, --under naming a missing folder or one with nothing indexed, another model's store."
)
def label(
    classes: str = typer.Option(..., "--classes", "-c", help="Comma-separated class names, e.g. cat,dog,sofa."),
    out_path: Path = typer.Option(..., "--out", "-o", help="JSON lines, one object per image ('-': standard output)."),
    under: Optional[Path] = typer.Option(None, "--under", help="Only images under this folder."),
    fallback: Optional[str] = typer.Option(
        None, "--fallback",
        help="Pixels no stored segment covers: none (default: unlabeled, counted apart) or nearest (the nearest "
        "labelled pixel's class, as `segment` does).",
    ),
) -> None:
    """Label every indexed image with CLASSES from its stored segments (paper §4.3 voting): which classes
    are present, their pixel areas and segments. A new class list costs a text embedding and dot
    products; the masks are the ones indexed, at each image's own size."""
    from use_search.factory import Runtime
    from use_search.voting.stored import STORED_FALLBACKS, LabelTotals, check_classes

    if fallback is not None and fallback not in STORED_FALLBACKS:
        raise ValueError(f"--fallback {fallback}: choose one of {', '.join(STORED_FALLBACKS)}")
    names = check_classes([c for c in classes.split(",") if c.strip()])
    if under is not None and not under.is_dir():
        raise ValueError(f"--under {under}: no such folder")
    folder = str(under.absolute()) if under is not None else None
    rt = Runtime.from_settings(state.settings)
    rt.preflight(("text",))
    embedder = rt.query_embedder()
    banner(embedder.untrained)
    totals = LabelTotals(names)
    with _open_store(writable=False) as store:
        labeler = rt.labeler(store, embedder, fallback)
        try:
            labeler.check(folder)
        except RuntimeError as e:  # StoreError: say which store
            raise type(e)(f"{e} (store {_store_label()})") from None
        vectors = labeler.class_vectors(names)
        total = sum(1 for _ in labeler.records(folder))
        to_stdout = str(out_path) == "-"
        with (nullcontext(sys.stdout) if to_stdout else out_path.open("w", encoding="utf-8")) as f, _progress() as bar:
            task = bar.add_task("labelling", total=total)
            for entry in labeler.records(folder):
                image = labeler.label_record(entry, names, vectors, folder)
                if image is not None:
                    _write(f, image.to_json())
                    totals.add(image)
                bar.advance(task)
    _print_totals(totals, labeler.fallback, to_stdout)
    if not to_stdout:
        err.print(f"{totals.images} images labelled; JSON lines written to {out_path}", highlight=False)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, transient=False)


def _write(f: IO[str], row: dict) -> None:
    f.write(json.dumps(row) + "\n")


def _print_totals(totals, fallback: str, to_stderr: bool) -> None:  # type: ignore[no-untyped-def]
    t = Table(title=f"{totals.images} images, {totals.pixels:,} pixels (fallback: {fallback})")
    for col in ("class", "images", "pixels", "share", "segments"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for row in totals.rows():
        share = row["pixels"] / totals.pixels if totals.pixels else 0.0
        t.add_row(escape(row["class"]), str(row["images"]), f"{row['pixels']:,}", f"{share:.1%}", str(row["segments"]))
    (err if to_stderr else out).print(t)
