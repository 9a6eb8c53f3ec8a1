"""``use-search`` command line: parses flags, calls the library, prints. No logic of its own."""

from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from use_search.config import Settings

from use_search.cli.shell import app, err, out, state
from use_search.cli.shell import open_store as _open_store
from use_search.cli.shell import store_label as _store_label
from use_search.presets import PRESET_CHOICES, PRESETS, UNTRAINED_BANNER, get_preset, preset_for, resolve
from use_search.weights import (
    REGISTRY,
    ChecksumError,
    MissingWeightsError,
    UnreadableCheckpointError,
    cache_path,
    download_size,
    fetch,
    missing_message,
    verify,
)

weights_app = typer.Typer(no_args_is_help=True, help="List, fetch and verify model checkpoints.")
app.add_typer(weights_app, name="weights")
model_app = typer.Typer(no_args_is_help=True, help="USE model checkpoints.")
app.add_typer(model_app, name="model")
curate_app = typer.Typer(no_args_is_help=True, help="Segment-text pair curation (paper §3.1).")
app.add_typer(curate_app, name="curate")


# User-facing failures: printed as one clear message, exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    MissingWeightsError, ChecksumError, UnreadableCheckpointError, ValueError,
    OSError,  # the machine said no (permissions, disk full, output closed): its message says what
)
# The same, from modules a command may not have imported (importing them just to name their errors
# would cost every command their imports: the store's clients, torch).
LAZY_USER_ERRORS = (
    ("use_search.store.base", "StoreError"),
    ("use_search.model.checkpoint", "BackboneMismatchError"),
)


def is_user_error(e: BaseException) -> bool:
    lazy = tuple(getattr(sys.modules[m], n) for m, n in LAZY_USER_ERRORS if m in sys.modules)
    return isinstance(e, USER_ERRORS + lazy)


@app.callback()
def common(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help=f"Model preset: {', '.join(PRESET_CHOICES)} (default: auto = paper with CUDA, base without)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Embedded store folder."),
    server: Optional[str] = typer.Option(None, "--server", help="Qdrant server URL (instead of the embedded store)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Qdrant server API key (default: env USE_SEARCH_STORE__API_KEY)."),
    collection: Optional[str] = typer.Option(None, "--collection", help="Collection name."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: auto)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Trained USE checkpoint (default: crop-CLIP baseline)."),
    sam: Optional[str] = typer.Option(None, "--sam", help="SAM instead of the preset's: registry name or checkpoint file."),
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
                    report = run(prune=prune, force=force, verify=verify, on_image=on_image, on_total=on_total)
                except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see _interrupts); the store closes below
                    bar.stop()
                    err.print(
                        f"[yellow]interrupted[/]: {saved} completed images are saved ({segs} segments); "
                        "rerun the same command to finish.", highlight=False,
                    )
                    raise typer.Exit(stopped.exit_code) from None
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


@app.command(
    epilog="Exit codes: 0 the hits are printed (none when none passes --min-score); 2 a usage or setup error: "
    "an empty store, --image / --under naming a missing path or one with nothing indexed, missing weights."
)
def query(
    text: str = typer.Argument(..., help="What to look for, e.g. \"car's license plate\"."),
    k: int = typer.Option(10, "-k", "--top", help="Number of results."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
    save: Optional[Path] = typer.Option(None, "--save", help="Write overlay PNGs of the hit masks here."),
    image: Optional[Path] = typer.Option(None, "--image", help="Only segments of this image."),
    under: Optional[Path] = typer.Option(None, "--under", help="Only images under this folder."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop hits below this cosine score."),
    dedup: bool = typer.Option(False, "--dedup", help="One hit per overlapping group of masks on an image."),
) -> None:
    """Embed TEXT with CLIP (prompt templates), search the store, show ranked segments."""
    from use_search.factory import Runtime
    from use_search.query.render import hit_overlay
    from use_search.query.search import Searcher
    from use_search.store.base import SearchFilter, StoreError

    rt = Runtime.from_settings(state.settings)
    rt.preflight(("text",))
    flt = SearchFilter(
        path=str(image.absolute()) if image else None, under=str(under.absolute()) if under else None
    )
    embedder = rt.query_embedder()  # CLIP's text tower only: a model problem shows before the store is opened
    with _open_store(writable=False) as store:
        if store.dim is None or store.count_segments() == 0:
            raise StoreError(f"the store at {_store_label()} is empty: run `use-search index FOLDER` first")
        banner(embedder.untrained)
        if not flt.is_empty() and store.count_segments(flt) == 0:
            raise StoreError(_nothing_indexed(image, under))
        hits = Searcher(store, embedder).search(text, k, None if flt.is_empty() else flt, min_score, dedup)
    if save:
        save.mkdir(parents=True, exist_ok=True)
    saved: dict[str, str] = {}
    for rank, h in enumerate(hits, 1):
        if save:
            dest = save / f"{rank:02d}-{Path(h.path).stem}-seg{h.segment_index}.png"
            try:
                hit_overlay(h, state.settings.max_image_pixels).save(dest)
                saved[h.id] = str(dest)
            except (OSError, ValueError) as e:
                err.print(f"[yellow]cannot render[/] {escape(h.path)}: {escape(str(e))}")
    if as_json:
        for rank, h in enumerate(hits, 1):
            row = {"rank": rank, **h.to_json()}
            if h.id in saved:
                row["overlay"] = saved[h.id]
            print(json.dumps(row))
        return
    t = Table(title=f"{len(hits)} segments for “{escape(text)}”")
    for col in ("rank", "score", "image", "segment", "bbox (x,y,w,h)", "area"):
        t.add_column(col, justify="right" if col in ("rank", "score", "area", "segment") else "left")
    for rank, h in enumerate(hits, 1):
        t.add_row(str(rank), f"{h.score:.4f}", escape(h.path), str(h.segment_index), ",".join(map(str, h.bbox)), str(h.area))
    # Piped or redirected: wide enough for whole paths (a terminal's table cuts them to fit).
    (out if out.is_terminal else Console(width=max(out.width, 120 + max((len(h.path) for h in hits), default=0)))).print(t)
    if save:
        err.print(f"overlays written to {save}")


def _nothing_indexed(image: Optional[Path], under: Optional[Path]) -> str:
    """Why ``--image`` / ``--under`` match no segment: the path is not there, or nothing is indexed there."""
    for opt, path, there in (("--image", image, image and image.is_file()), ("--under", under, under and under.is_dir())):
        if path is not None and not there:
            return f"{opt} {path}: no such {'file' if opt == '--image' else 'folder'}"
    where = f"{image}" if image else f"under {under}"
    return f"nothing is indexed {'for ' if image else ''}{where} in {_store_label()}: run `use-search index {image or under}` first"


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


# Options shared by `segment` and `eval semseg|parts` (semantic segmentation by voting, §4.3, A.2).
MODELS_HELP = (
    "USE checkpoint PATH[:WEIGHT]; repeat it for an ensemble whose per-segment class probabilities are "
    "combined with the weights before voting (paper A.2: curated-data model 1, COCO-ground-truth model 0.7 "
    "on PC-59, 0.25 elsewhere). Given here it replaces the global --model for this command; index and query "
    "always use the one global --model (a store holds one vector space). Default: the global --model, else crop-CLIP."
)
OPT_MODELS = typer.Option(None, "--model", "-m", help=MODELS_HELP)
OPT_COMBINE = typer.Option(
    None, "--combine",
    help="Ensemble combination: ovseg (default, A.2 \"same as OVSeg\": p1^(1-λ)·p2^λ with λ = the second --model's "
    "weight relative to the first, so -m curated:1 -m cocogt:0.25 gives p1^0.75·p2^0.25; the λ must sum below 1), "
    "mean (Σ w·p / Σ w) or geometric (Π p^(w/Σw), renormalised per segment).",
)
OPT_TEMPLATES = typer.Option(None, "--templates", help="Class-name templates: train4, imagenet80 (default) or a file, one per line with {}.")
OPT_LOGIT_SCALE = typer.Option(None, "--logit-scale", help="Softmax scale on cosines (default: each model's training scale; crop-CLIP 100).")
OPT_FALLBACK = typer.Option(
    None, "--fallback",
    help="Pixels no segment covers: nearest (the nearest labelled pixel's class; default of segment), image (the "
    "whole image's class; covered pixels keep their vote) or none (unlabeled, 255; default of eval semseg, the "
    "paper's protocol: a miss).",
)
OPT_POINTS = typer.Option(None, "--points-per-side", min=1, help="SAM point grid side (default: the preset's; SAM's 32).")
OPT_PRED_IOU = typer.Option(None, "--pred-iou-thresh", min=0.0, max=1.0, help="SAM predicted-IoU filter (default: SAM's 0.88).")
OPT_STABILITY = typer.Option(None, "--stability-thresh", min=0.0, max=1.0, help="SAM stability-score filter (default: SAM's 0.95).")


def _voting_settings(
    models: Optional[list[str]], combine: Optional[str], templates: Optional[str], logit_scale: Optional[float],
    fallback: Optional[str], points_per_side: Optional[int],
    pred_iou_thresh: Optional[float], stability_thresh: Optional[float],
) -> Settings:
    """``state.settings`` with the voting and automatic-mask flags applied (validated by the settings model)."""
    s = state.settings
    voting = {k: v for k, v in dict(
        models=models or None, combine=combine, templates=templates, logit_scale=logit_scale, fallback=fallback,
    ).items() if v is not None}
    amg = {k: v for k, v in dict(
        points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_thresh,
    ).items() if v is not None}
    return type(s).model_validate({
        **s.model_dump(), "voting": {**s.voting.model_dump(), **voting}, "amg": {**s.amg.model_dump(), **amg},
    })


def _voting_models(settings: Settings):  # type: ignore[no-untyped-def]
    """The SAM segmenter and the voting ensemble; says which models vote with which weight and scale."""
    from use_search.factory import Runtime
    from use_search.query.voting import load_ensemble

    rt = Runtime.from_settings(settings)
    rt.preflight(("sam",))
    ensemble = load_ensemble(settings)
    banner(ensemble.untrained)
    for m in ensemble.describe():
        err.print(f"model {m['model']}  weight {m['weight']:g}  softmax scale {m['logit_scale']:g}", highlight=False)
    return rt.segmenter(), ensemble


def _amg_json(segmenter) -> dict:  # type: ignore[no-untyped-def]
    import dataclasses

    return {**dataclasses.asdict(segmenter.params), "engine": type(segmenter).__name__}


@app.command()
def segment(
    image: Path = typer.Argument(..., help="The image to label."),
    classes: str = typer.Option(..., "--classes", "-c", help="Comma-separated class names, e.g. cat,grass,sky."),
    out_path: Path = typer.Option(Path("labels.png"), "--out", "-o", help="Label PNG: pixel = class index, 255 = unlabeled."),
    models: Optional[list[str]] = OPT_MODELS,
    combine: Optional[str] = OPT_COMBINE,
    templates: Optional[str] = OPT_TEMPLATES,
    logit_scale: Optional[float] = OPT_LOGIT_SCALE,
    fallback: Optional[str] = OPT_FALLBACK,
    points_per_side: Optional[int] = OPT_POINTS,
    pred_iou_thresh: Optional[float] = OPT_PRED_IOU,
    stability_thresh: Optional[float] = OPT_STABILITY,
) -> None:
    """Semantic segmentation by voting (paper §4.3): SAM segments, softmax over classes (combined over
    an ensemble of models, A.2), per-pixel sum."""
    settings = _voting_settings(models, combine, templates, logit_scale, fallback,
                                points_per_side, pred_iou_thresh, stability_thresh)
    from use_search.imaging import working_side
    from use_search.indexer.read import ImageReadError, read_image
    from use_search.query.voting import check_class_names, label_png, segment_by_voting

    names = check_class_names([c for c in classes.split(",") if c.strip()])
    segmenter, ensemble = _voting_models(settings)
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


@curate_app.command("run")
def curate_run(
    images: Path = typer.Argument(..., help="Folder of images (recursive) or one image."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Shard folder (resumable: done images are skipped)."),
    sidecar: bool = typer.Option(False, "--sidecar-captions", help="photo.jpg → photo.txt, one caption per line."),
    coco_captions: Optional[Path] = typer.Option(None, "--coco-captions", help="COCO captions JSON."),
    mllm: Optional[str] = typer.Option(
        None, "--mllm", help="Captioning MLLM: Hugging Face id or folder (e.g. llava-hf/llava-1.5-7b-hf; THUDM/cogvlm-chat-hf "
        "with --mllm-processor lmsys/vicuna-7b-v1.5 --trust-remote-code).",
    ),
    mllm_processor: Optional[str] = typer.Option(
        None, "--mllm-processor", help="Processor or tokenizer id/folder for an MLLM checkpoint that ships none (CogVLM).",
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code",
        help="Let the --mllm checkpoint run the Python code it ships (needed by CogVLM). That code runs with your "
        "user's rights and can read, change or send anything you can: read it first, and use only sources you trust.",
    ),
    mllm_batch_size: int = typer.Option(8, "--mllm-batch-size", min=1, help="Images per MLLM generate call."),
    mllm_max_new_tokens: int = typer.Option(512, "--mllm-max-new-tokens", min=1, help="Longest MLLM caption, in tokens."),
    mllm_prompt_template: str = typer.Option(
        "{prompt}", "--mllm-prompt-template",
        help="For MLLM processors without a chat template: the text beside the image, {prompt} being the paper's prompt.",
    ),
    vg_regions: Optional[Path] = typer.Option(None, "--vg-regions", help="Visual Genome region_descriptions.json (no grounding)."),
    vg_image_data: Optional[Path] = typer.Option(
        None, "--vg-image-data",
        help="VG image_data.json: the images are COCO images; each gets the regions of the VG image with its coco_id, "
        "scaled to its size.",
    ),
    grounding: Optional[str] = typer.Option(None, "--grounding", help="Grounding DINO id or folder (default: grounding-dino-tiny)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many new images."),
) -> None:
    """Captions → phrases/expressions → grounding boxes → SAM masks → mask NMS → pair shards."""
    from use_search.curation import CurationConfig, run_curation
    from use_search.curation.captions import GenerationParams

    generation = GenerationParams(max_new_tokens=mllm_max_new_tokens, prompt_template=mllm_prompt_template)
    banner()
    s = state.settings
    preset = preset_for(s)  # with --sam/--clip/--dinov2
    tiny = get_preset(resolve(s)).untrained  # the tiny preset grounds with its tiny Grounding DINO too
    cfg = CurationConfig(
        images=images, out=out_dir, sidecar_captions=sidecar, coco_captions=coco_captions, mllm=mllm,
        mllm_processor=mllm_processor, trust_remote_code=trust_remote_code, mllm_batch_size=mllm_batch_size,
        generation=generation,
        vg_regions=vg_regions, vg_image_data=vg_image_data, sam=preset.sam, limit=limit, settings=s,
        **({"grounding_model": grounding} if grounding else {"grounding_model": "tiny"} if tiny else {}),
    )
    r = run_curation(cfg)
    if r.untrained and not preset.untrained:  # a tiny model the preset did not announce (e.g. --grounding tiny)
        banner(True)
    for path, reason in r.images_failed:
        err.print(f"[yellow]failed[/] {escape(str(path))}: {escape(str(reason))}")
    t = Table(title="curation summary", show_header=False)
    for k, v in [
        ("images found / skipped / curated / without text",
         f"{r.images_found} / {r.images_skipped} / {r.images_curated} / {r.images_without_text}"),
        ("failed", len(r.images_failed)), ("pairs before NMS", r.pairs_before_nms), ("segments after NMS", r.segments),
        ("shards written", len(r.shards_written)), ("time", f"{r.seconds:.1f} s"),
    ]:
        t.add_row(k, str(v))
    err.print(t)


@curate_app.command("stats")
def curate_stats(folder: Path = typer.Argument(..., help="Shard folder written by `curate run`.")) -> None:
    """The paper's Table 1 figures for a shard folder: #pairs, #pairs after NMS, #unique expressions."""
    from use_search.curation import shard_stats

    st = shard_stats(folder)
    t = Table(title=f"pairs in {folder}")
    for col in ("images", "#pairs", "#pairs w/ NMS", "#expressions (unique)"):
        t.add_column(col, justify="right")
    t.add_row(str(st.images), str(st.pairs), str(st.pairs_after_nms), str(st.unique_expressions))
    out.print(t)
    for kind, n in sorted(st.unique_by_kind.items()):
        out.print(f"unique {kind}s: {n}")


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


@app.command()
def stats() -> None:
    """Counts of images (by content and by path) and segments in the store."""
    with _open_store(writable=False) as store:
        out.print(f"store: {_store_label()}")
        out.print(
            f"images: {store.count_contents()}  paths: {store.count_images()}  segments: {store.count_segments()}  dim: {store.dim}"
        )


@weights_app.command("list")
def weights_list() -> None:
    """Known checkpoints, where they are cached, and whether they are present."""
    t = Table()
    for col in ("name", "kind", "arch", "size", "cached at", "present"):
        t.add_column(col)
    for spec in REGISTRY.values():
        path = state.settings.weights_path / spec.filename
        t.add_row(spec.name, spec.kind, spec.arch, f"{spec.size_mb} MB", escape(str(path)), "yes" if path.is_file() else "no")
    out.print(t)
    for p in PRESETS.values():
        out.print(f"preset [bold]{p.name}[/]: sam={p.sam} clip={p.clip} dinov2={p.dinov2}" + ("  (random init, untrained)" if p.untrained else ""))


def _names(names: list[str], preset: Optional[str]) -> list[str]:
    if preset:
        p = get_preset(resolve(state.settings.model_copy(update={"preset": preset})))
        names = names + [n for n in (p.sam, p.clip, p.dinov2) if n != "tiny"]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown checkpoint(s): {', '.join(unknown)}; see `use-search weights list`")
    if not names:
        raise ValueError("name checkpoints or a --preset")
    return names


@weights_app.command("fetch")
def weights_fetch(
    names: list[str] = typer.Argument(None, help="Checkpoint names (see `weights list`)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Every checkpoint a preset needs."),
) -> None:
    """Download checkpoints into the cache, verifying their size and sha256. With --offline it only
    checks what is cached and never touches the network. The total download size is printed first."""
    s = state.settings
    checked = [(REGISTRY[name], *verify(REGISTRY[name], s)) for name in _names(names or [], preset)]
    todo = [spec for spec, ok, _ in checked if not ok]
    if todo and not s.is_offline:
        err.print(f"downloading {len(todo)} checkpoint(s), {download_size(todo)} in total: "
                  f"{', '.join(f'{t.name} ({t.size_mb} MB)' for t in todo)}", highlight=False, soft_wrap=True)
    problems: list[str] = []
    for spec, ok, msg in checked:
        if ok:
            out.print(f"{spec.name}: already cached")
            continue
        if cache_path(spec, s).is_file():  # there, but not the published file
            if s.is_offline:
                problems.append(f"{spec.name}: {msg} (offline: not downloading it again)")
                continue
            err.print(f"[yellow]{spec.name}[/]: {msg}; downloading it again")
        elif s.is_offline:
            problems.append(missing_message(spec, s, "offline mode: not downloading"))
            continue
        out.print(f"{spec.name}: {escape(str(fetch(spec, s)))}")
    if problems:
        raise MissingWeightsError("\n".join(problems))


@weights_app.command("verify", epilog="Exit codes: 0 every checkpoint named is cached and matches; 1 one or more "
                     "is missing or does not match (each is listed); 2 a usage error (unknown name).")
def weights_verify(
    names: list[str] = typer.Argument(None, help="Checkpoint names (default: all)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Every checkpoint a preset needs."),
) -> None:
    """Check cached checkpoints against their published sha256."""
    chosen = _names(names or [], preset) if (names or preset) else list(REGISTRY)
    bad = 0
    for name in chosen:
        ok, msg = verify(REGISTRY[name], state.settings)
        bad += not ok
        out.print(f"[{'green' if ok else 'red'}]{name}[/]: {msg}")
    raise typer.Exit(1 if bad else 0)


# --- use-search eval: semseg | parts | retrieval (paper §4.3-4.4; use_search.eval) -------------------
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
def eval_semseg(
    images: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    labels: Path = typer.Argument(..., help="Folder of label PNGs, same relative names as the images (pixel = class index)."),
    classes: Path = typer.Option(..., "--classes", "-c", help="Class list: one name per line, line i = label i."),
    ignore_index: int = typer.Option(255, "--ignore-index", help="Label value left out of the scores (65535 for 16-bit TIFF labels)."),
    reduce_zero_label: bool = typer.Option(False, "--reduce-zero-label", help="ADE20K / PC-59 files: 0 = ignore, v → v-1."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images (sorted by path)."),
    save_preds: Optional[Path] = typer.Option(None, "--save-preds", help="Write predicted label PNGs here."),
    models: Optional[list[str]] = OPT_MODELS,
    combine: Optional[str] = OPT_COMBINE,
    templates: Optional[str] = OPT_TEMPLATES,
    logit_scale: Optional[float] = OPT_LOGIT_SCALE,
    fallback: Optional[str] = OPT_FALLBACK,
    points_per_side: Optional[int] = OPT_POINTS,
    pred_iou_thresh: Optional[float] = OPT_PRED_IOU,
    stability_thresh: Optional[float] = OPT_STABILITY,
    per_class: bool = typer.Option(False, "--per-class", help="Also print the per-class table."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the results as JSON here."),
) -> None:
    """mIoU / pAcc / mAcc of §4.3 voting over SAM segments on ADE20K / Pascal-Context-style data.
    Several --model PATH:WEIGHT vote as an ensemble (A.2)."""
    settings = _voting_settings(models, combine, templates, logit_scale, fallback,
                                points_per_side, pred_iou_thresh, stability_thresh)
    from use_search.eval import SemsegDataset, evaluate_semseg
    from use_search.model.text import template_set

    ds = SemsegDataset.from_folders(images, labels, classes, ignore_index, reduce_zero_label, limit)
    template_set(settings.voting.templates)  # a bad name or file fails before any model loads
    segmenter, ensemble = _voting_models(settings)
    with _eval_progress("semseg") as bar:
        task = bar.add_task("semseg", total=len(ds.pairs), name="")
        result = evaluate_semseg(
            ds, segmenter, ensemble, voting=settings.voting, save_dir=save_preds,
            max_image_pixels=settings.max_image_pixels,
            on_image=lambda done, total, name: bar.update(task, completed=done, name=name),
        )
    res = result.to_json()
    res["settings"]["amg"] = _amg_json(segmenter)
    _eval_report(
        res, f"semseg: {len(ds.classes)} classes, {result.images} images",
        ["mIoU", "pAcc", "mAcc", "images", "segments", "uncovered_pixels", "unlabeled_pixels", "seconds"],
        ("per_class", ["class", "IoU", "Acc", "gt_pixels"]) if per_class else None, as_json, out_file,
    )


@eval_app.command("parts")
def eval_parts(
    images: Path = typer.Argument(..., help="Folder the annotations' file_names are relative to."),
    annotations: Path = typer.Argument(..., help="COCO-format instance annotations of the part classes (e.g. PartImageNet)."),
    background: Optional[Path] = typer.Option(None, "--background", help="Background class list, one per line "
                                              "(default: the 91 COCO-stuff classes + the parts' super-categories)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images (by id)."),
    models: Optional[list[str]] = OPT_MODELS,
    combine: Optional[str] = OPT_COMBINE,
    templates: Optional[str] = OPT_TEMPLATES,
    logit_scale: Optional[float] = OPT_LOGIT_SCALE,
    points_per_side: Optional[int] = OPT_POINTS,
    pred_iou_thresh: Optional[float] = OPT_PRED_IOU,
    stability_thresh: Optional[float] = OPT_STABILITY,
    per_class: bool = typer.Option(False, "--per-class", help="Also print the per-class AP table."),
    detections: Optional[Path] = typer.Option(None, "--detections", help="Write the scored detections (COCO results JSON) here."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the results as JSON here."),
) -> None:
    """Mask mAP@[.5:.95] (COCOeval) of the SAM segments whose top class is a part (§4.4).
    Several --model PATH:WEIGHT vote as an ensemble (A.2)."""
    settings = _voting_settings(models, combine, templates, logit_scale, None,
                                points_per_side, pred_iou_thresh, stability_thresh)
    from use_search.eval import PartsDataset, evaluate_parts
    from use_search.eval.common import read_class_list
    from use_search.model.text import template_set

    ds = PartsDataset.load(images, annotations, limit)
    bg = read_class_list(background) if background else None
    template_set(settings.voting.templates)  # a bad name or file fails before any model loads
    segmenter, ensemble = _voting_models(settings)
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
    res["settings"]["amg"] = _amg_json(segmenter)
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
    from use_search.eval import RetrievalDataset, index_and_evaluate

    cutoffs = [int(k) for k in ks.split(",") if k.strip()]
    ds = RetrievalDataset(images, annotations)
    rt, segmenter, embedder, side = _eval_models()

    def evaluate(store):  # type: ignore[no-untyped-def]
        with _eval_progress("indexing") as bar:
            task = bar.add_task("index", total=None, name="")
            return index_and_evaluate(
                ds, segmenter, embedder, store, ks=cutoffs, depth=depth, iou_threshold=iou,
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


from use_search.cli import prune as _prune  # noqa: E402,F401 - registers `use-search prune`
from use_search.cli.store_cmds import store_app  # noqa: E402

app.add_typer(store_app, name="store")


def error_text(e: BaseException) -> str:
    """The message of a user error; a settings error names each bad setting and the value given."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or not isinstance(e, pydantic.ValidationError):
        return str(e)
    return "; ".join(
        f"invalid setting {'.'.join(map(str, x['loc'])) or 'value'}: {x['msg']} (got {x['input']!r})"
        for x in e.errors(include_url=False)
    ) + " (check the command line options, USE_SEARCH_* variables and the settings file)"




def main() -> None:
    try:
        app()
    except Exception as e:
        if not is_user_error(e):
            raise
        err.print(f"[bold red]error:[/] {error_text(e)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: completed images are saved; rerun the same command to finish.")
        sys.exit(130)
