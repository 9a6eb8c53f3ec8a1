"""Checkpoint registry: official names → URL, sha256 and cache path; downloads; clear errors offline.

A checkpoint is named either by its registry name (``sam_vit_h``) or by a local file path, which
always works. Nothing here ever substitutes random weights for a missing file: the ``tiny`` preset's
random-init models are a separate, explicit architecture (see ``presets.py``), never a fallback.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn, TimeRemainingColumn

from use_search.config import Settings

Kind = Literal["sam", "clip", "dinov2"]


@dataclass(frozen=True)
class WeightSpec:
    name: str
    kind: Kind
    arch: str  # segment-anything model type, open_clip model name, or timm model name
    filename: str
    url: str
    sha256: str | None
    size_mb: int
    source: str  # who publishes it, for the docs and the error message


REGISTRY: dict[str, WeightSpec] = {
    s.name: s
    for s in [
        WeightSpec(
            "sam_vit_h", "sam", "vit_h", "sam_vit_h_4b8939.pth",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2445, "Meta AI, segment-anything",
        ),
        WeightSpec(
            "sam_vit_l", "sam", "vit_l", "sam_vit_l_0b3195.pth",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1250, "Meta AI, segment-anything",
        ),
        WeightSpec(
            "sam_vit_b", "sam", "vit_b", "sam_vit_b_01ec64.pth",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375, "Meta AI, segment-anything",
        ),
        # OpenAI's CLIP releases (TorchScript archives; the sha256 is part of OpenAI's URL). open_clip
        # names them ``<model>/openai``; both the archive and an open_clip state dict load.
        WeightSpec(
            "clip_vit_l14_336_openai", "clip", "ViT-L-14-336", "ViT-L-14-336px.pt",
            "https://openaipublic.azureedge.net/clip/models/"
            "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
            "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", 891, "OpenAI CLIP (open_clip: ViT-L-14-336/openai)",
        ),
        WeightSpec(
            "clip_vit_b16_openai", "clip", "ViT-B-16", "ViT-B-16.pt",
            "https://openaipublic.azureedge.net/clip/models/"
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", 335, "OpenAI CLIP (open_clip: ViT-B-16/openai)",
        ),
        # DINOv2 (paper §4.2: ViT-L/14 distilled), Meta's official backbone files.
        WeightSpec(
            "dinov2_vitl14", "dinov2", "vit_large_patch14_dinov2", "dinov2_vitl14_pretrain.pth",
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
            None, 1161, "Meta AI, DINOv2",
        ),
        WeightSpec(
            "dinov2_vits14", "dinov2", "vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth",
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
            None, 84, "Meta AI, DINOv2",
        ),
    ]
}


class MissingWeightsError(RuntimeError):
    """A checkpoint is needed but not on disk and cannot be downloaded."""


class ChecksumError(RuntimeError):
    pass


def cache_path(spec: WeightSpec, settings: Settings) -> Path:
    return settings.weights_path / spec.filename


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def missing_message(spec: WeightSpec, settings: Settings, reason: str = "") -> str:
    dest = cache_path(spec, settings)
    why = f" ({reason})" if reason else ""
    return (
        f"checkpoint '{spec.name}' ({spec.source}, ~{spec.size_mb} MB) is not at {dest}{why}.\n"
        f"  On a connected machine:  use-search weights fetch {spec.name}\n"
        f"  Or download {spec.url}\n"
        f"  and put it at {dest} (or point USE_SEARCH_WEIGHTS_DIR at the folder that holds {spec.filename})."
    )


def resolve(name_or_path: str | Path, settings: Settings, *, download: bool = True) -> Path:
    """A local file path, or the cached file of a registry name (downloading it if allowed and online)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    spec = REGISTRY.get(str(name_or_path))
    if spec is None:
        raise MissingWeightsError(
            f"'{name_or_path}' is neither a file nor a known checkpoint name ({', '.join(sorted(REGISTRY))})"
        )
    dest = cache_path(spec, settings)
    if dest.is_file():
        return dest
    if not download or settings.is_offline:
        raise MissingWeightsError(missing_message(spec, settings, "offline mode" if settings.is_offline else ""))
    return fetch(spec, settings)


def fetch(spec: WeightSpec, settings: Settings, *, progress: bool = True, connect_timeout: float = 10.0) -> Path:
    """Download ``spec`` into the cache with a progress bar; verify sha256; move into place atomically.

    A network failure is a ``MissingWeightsError`` that says where to put the file by hand."""
    dest = cache_path(spec, settings)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + f".part{os.getpid()}")
    h = hashlib.sha256()
    timeout = httpx.Timeout(60.0, connect=connect_timeout)
    try:
        with httpx.stream("GET", spec.url, follow_redirects=True, timeout=timeout) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length", 0)) or None
            with open(part, "wb") as f, Progress(
                "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), disable=not progress, transient=True,
            ) as bar:
                task = bar.add_task(spec.filename, total=total)
                for block in r.iter_bytes(1 << 20):
                    f.write(block)
                    h.update(block)
                    bar.advance(task, len(block))
        if spec.sha256 is not None and h.hexdigest() != spec.sha256:
            raise ChecksumError(
                f"{spec.url} downloaded with sha256 {h.hexdigest()}, expected {spec.sha256}; file discarded"
            )
        os.replace(part, dest)
        return dest
    except (httpx.HTTPError, OSError) as e:
        raise MissingWeightsError(missing_message(spec, settings, f"download failed: {e}")) from e
    finally:
        part.unlink(missing_ok=True)


def verify(spec: WeightSpec, settings: Settings) -> tuple[bool, str]:
    """(ok, message) for the cached file of ``spec``."""
    dest = cache_path(spec, settings)
    if not dest.is_file():
        return False, f"missing: {dest}"
    if spec.sha256 is None:
        return True, f"present (no published checksum): {dest}"
    got = sha256_file(dest)
    if got != spec.sha256:
        return False, f"checksum mismatch: {dest} has {got}, expected {spec.sha256}"
    return True, f"ok: {dest}"
