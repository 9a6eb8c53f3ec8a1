"""``use-search eval semseg | parts | retrieval``: score segmenter + embedder (paper §4.3-4.4; use_search.eval)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from use_search.cli.options import VotingFlags, amg_json, voting_models, voting_options
from use_search.cli.shell import app, banner, err, out, state

eval_app = typer.Typer(no_args_is_help=True, help="Score segmenter + embedder: semantic segmentation, part segmentation, retrieval.")
app.add_typer(eval_app, name="eval")


def _eval_models():  # type: ignore[no-untyped-def]
    from use_search.factory import Runtime

    rt = Runtime.from_settings(state.settings)
    rt.preflight(("sam", "clip"))
    segmenter, embedder, side = rt.engine_parts()
    banner(embedder.untrained)
    return rt, segmenter, embedder, side


def _eval_progress(label: str) -> Progress:
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[name]}"),
                    TimeElapsedColumn(), console=err)


def _eval_report(result: dict, title: str, summary: list[str], per_class: Optional[tuple[str, list[str]]],
                 as_json: bool, out_file: Optional[Path]) -> None:
    """Print the figures (table or JSON) and write the JSON file if asked."""
    if out_file:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=2))
    if as_json:
        print(json.dumps(result))
        return

    def fmt(v: object) -> str:
        return "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    t = Table(title=title, show_header=False)
    for key in summary:
        t.add_row(key, fmt(result.get(key)))
    out.print(t)
    if per_class:
        rows_key, cols = per_class
        pc = Table(title=rows_key.replace("_", " "))
        for c in cols:
            pc.add_column(c, justify="left" if c in ("class", "text") else "right")
        for row in result[rows_key]:
            pc.add_row(*(fmt(row.get(c)) for c in cols))
        out.print(pc)
    if out_file:
        err.print(f"results written to {out_file}")


@eval_app.command("semseg")
@voting_options()
def eval_semseg(
    images: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    labels: Path = typer.Argument(..., help="Folder of label PNGs, same relative names as the images (pixel = class index)."),
    classes: Path = typer.Option(..., "--classes", "-c", help="Class list: one name per line, line i = label i."),
    ignore_index: int = typer.Option(255, "--ignore-index", help="Label value left out of the scores (65535 for 16-bit TIFF labels)."),
    reduce_zero_label: bool = typer.Option(False, "--reduce-zero-label", help="ADE20K / PC-59 files: 0 = ignore, v → v-1."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images (sorted by path)."),
    save_preds: Optional[Path] = typer.Option(None, "--save-preds", help="Write predicted label PNGs here."),
    flags: VotingFlags = VotingFlags(),
    per_class: bool = typer.Option(False, "--per-class", help="Also print the per-class table."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the results as JSON here."),
) -> None:
    """mIoU / pAcc / mAcc of §4.3 voting over SAM segments on ADE20K / Pascal-Context-style data.
    Several --member PATH:WEIGHT vote as an ensemble (A.2)."""
    settings = flags.settings()
    from use_search.eval import SemsegDataset, evaluate_semseg
    from use_search.model.text import template_set

    ds = SemsegDataset.from_folders(images, labels, classes, ignore_index, reduce_zero_label, limit)
    template_set(settings.voting.templates)  # a bad name or file fails before any model loads
    segmenter, ensemble = voting_models(settings)
    with _eval_progress("semseg") as bar:
        task = bar.add_task("semseg", total=len(ds.pairs), name="")
        result = evaluate_semseg(
            ds, segmenter, ensemble, voting=settings.voting, save_dir=save_preds,
            max_image_pixels=settings.max_image_pixels,
            on_image=lambda done, total, name: bar.update(task, completed=done, name=name),
        )
    res = result.to_json()
    res["settings"]["amg"] = amg_json(segmenter)
    _eval_report(
        res, f"semseg: {len(ds.classes)} classes, {result.images} images",
        ["mIoU", "pAcc", "mAcc", "images", "segments", "uncovered_pixels", "unlabeled_pixels", "seconds"],
        ("per_class", ["class", "IoU", "Acc", "gt_pixels"]) if per_class else None, as_json, out_file,
    )


@eval_app.command("parts")
@voting_options(fallback=False)
def eval_parts(
    images: Path = typer.Argument(..., help="Folder the annotations' file_names are relative to."),
    annotations: Path = typer.Argument(..., help="COCO-format instance annotations of the part classes (e.g. PartImageNet)."),
    background: Optional[Path] = typer.Option(None, "--background", help="Background class list, one per line "
                                              "(default: the 91 COCO-stuff classes + the parts' super-categories)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images (by id)."),
    flags: VotingFlags = VotingFlags(),
    per_class: bool = typer.Option(False, "--per-class", help="Also print the per-class AP table."),
    detections: Optional[Path] = typer.Option(None, "--detections", help="Write the scored detections (COCO results JSON) here."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the results as JSON here."),
) -> None:
    """Mask mAP@[.5:.95] (COCOeval) of the SAM segments whose top class is a part (§4.4).
    Several --member PATH:WEIGHT vote as an ensemble (A.2)."""
    settings = flags.settings()
    from use_search.eval import PartsDataset, evaluate_parts
    from use_search.eval.common import read_class_list
    from use_search.model.text import template_set

    ds = PartsDataset.load(images, annotations, limit)
    bg = read_class_list(background) if background else None
    template_set(settings.voting.templates)  # a bad name or file fails before any model loads
    segmenter, ensemble = voting_models(settings)
    with _eval_progress("parts") as bar:
        task = bar.add_task("parts", total=len(ds.img_ids), name="")
        result = evaluate_parts(
            ds, segmenter, ensemble, background=bg, voting=settings.voting,
            max_image_pixels=settings.max_image_pixels,
            on_image=lambda done, total, name: bar.update(task, completed=done, name=name),
        )
    if detections:
        detections.write_text(json.dumps(result.detections))
    res = result.to_json()
    res["settings"]["amg"] = amg_json(segmenter)
    _eval_report(
        res, f"parts: {len(result.part_names)} part + {len(result.background)} background classes",
        ["mAP", "AP50", "AP75", "images", "segments", "detections", "seconds"],
        ("per_class", ["category_id", "class", "AP"]) if per_class else None, as_json, out_file,
    )


@eval_app.command("retrieval")
def eval_retrieval(
    images: Path = typer.Argument(..., help="Folder the annotations' file_names are relative to; all of it is indexed."),
    annotations: Path = typer.Argument(..., help="COCO-format instance annotations; each category name is a query."),
    ks: str = typer.Option("1,5,10", "-k", "--ks", help="Comma-separated cut-offs for recall@k."),
    depth: int = typer.Option(100, "--depth", help="Hits fetched per query (mAP is over these)."),
    iou: float = typer.Option(0.5, "--iou", help="Mask IoU a hit needs with a ground-truth instance."),
    into_store: bool = typer.Option(False, "--into-store", help="Index into the configured store (--store/--server) "
                                    "instead of a temporary one; already indexed images are not redone."),
    per_class: bool = typer.Option(False, "--per-class", help="Also print the per-query table."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the results as JSON here."),
) -> None:
    """Text → segment recall@k and mAP: index the images, query every category name."""
    from use_search.eval import RetrievalDataset, RetrievalOptions, index_and_evaluate

    cutoffs = [int(k) for k in ks.split(",") if k.strip()]
    ds = RetrievalDataset(images, annotations)
    rt, segmenter, embedder, side = _eval_models()

    def evaluate(store):  # type: ignore[no-untyped-def]
        with _eval_progress("indexing") as bar:
            task = bar.add_task("index", total=None, name="")
            return index_and_evaluate(
                ds, segmenter, embedder, store, options=RetrievalOptions(ks=cutoffs, depth=depth, iou_threshold=iou),
                max_image_pixels=state.settings.max_image_pixels, extensions=state.settings.image_extensions,
                on_image=lambda ev: bar.update(task, advance=1, name=Path(ev.path).name),
                work_side=side,  # what `index` does
            )

    if into_store:
        with rt.store() as store:
            result = evaluate(store)
    else:
        result = evaluate(None)
    res = result.to_json()
    _eval_report(
        res, f"retrieval: {len(result.queries)} queries over {result.segments} segments",
        ["mAP", *[f"recall@{k}" for k in result.ks], *[f"instance_recall@{k}" for k in result.ks], "images", "segments", "seconds"],
        ("per_query", ["category_id", "text", "instances", "AP", "first_correct_rank"]) if per_class else None,
        as_json, out_file,
    )

