"""``use-search curate run | stats``: segment-text pair curation (paper §3.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from use_search.cli.shell import app, banner, err, out, state
from use_search.presets import get_preset, preset_for, resolve

curate_app = typer.Typer(no_args_is_help=True, help="Segment-text pair curation (paper §3.1).")
app.add_typer(curate_app, name="curate")


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
    from use_search.model.registry import TINY

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
        **({"grounding_model": grounding} if grounding else {"grounding_model": TINY} if tiny else {}),
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

