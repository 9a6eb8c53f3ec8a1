"""``use-search segment``: semantic segmentation of one image by voting (paper §4.3)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from use_search.cli.options import VotingFlags, voting_models, voting_options
from use_search.cli.shell import app, err, out

@app.command()
@voting_options()
def segment(
    image: Path = typer.Argument(..., help="The image to label."),
    classes: str = typer.Option(..., "--classes", "-c", help="Comma-separated class names, e.g. cat,grass,sky."),
    out_path: Path = typer.Option(Path("labels.png"), "--out", "-o", help="Label PNG: pixel = class index, 255 = unlabeled."),
    flags: VotingFlags = VotingFlags(),
) -> None:
    """Semantic segmentation by voting (paper §4.3): SAM segments, softmax over classes (combined over
    an ensemble of models, A.2), per-pixel sum."""
    settings = flags.settings()
    from use_search.imaging import working_side
    from use_search.indexer.read import ImageReadError, read_image
    from use_search.voting.predict import segment_by_voting
    from use_search.voting.png import label_png
    from use_search.voting.vote import check_class_names

    names = check_class_names([c for c in classes.split(",") if c.strip()])
    segmenter, ensemble = voting_models(settings)
    try:  # at the working size, as the API's /segment
        loaded = read_image(image, settings.max_image_pixels, working_side(segmenter, settings.work_side))
    except ImageReadError as e:
        raise ValueError(f"{image}: {e}") from None
    votes = segment_by_voting(loaded.pixels, names, segmenter, ensemble, settings.voting)
    labels = votes.labels
    out_path.write_bytes(label_png(labels))
    t = Table(title=f"{escape(image.name)}: {labels.shape[1]}×{labels.shape[0]}, {votes.segments} segments")
    for col, just in (("index", "right"), ("class", "left"), ("pixels", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for i, (name, m) in enumerate(votes.masks(names).items()):
        t.add_row(str(i), escape(name), str(int(m.sum())))
    t.add_row("255", "(unlabeled)", str(votes.unlabeled_pixels))
    out.print(t)
    err.print(f"{votes.uncovered_pixels} pixels no segment covered (fallback: {votes.fallback}); "
              f"labels written to {out_path}", highlight=False)

