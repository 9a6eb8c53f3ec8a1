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
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

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
    # Exact size of the published file: a cheap first check (a truncated download or a 16-byte HTML
    # error page fails it at once), and the only check where no sha256 is published.
    size_bytes: int | None = None


REGISTRY: dict[str, WeightSpec] = {
    s.name: s
    for s in [
        WeightSpec(
            "sam_vit_h", "sam", "vit_h", "sam_vit_h_4b8939.pth",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2445, "Meta AI, segment-anything",
            2_564_550_879,
        ),
        WeightSpec(
            "sam_vit_l", "sam", "vit_l", "sam_vit_l_0b3195.pth",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1250, "Meta AI, segment-anything",
            1_249_524_607,
        ),
        WeightSpec(
            "sam_vit_b", "sam", "vit_b", "sam_vit_b_01ec64.pth",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375, "Meta AI, segment-anything",
            375_042_383,
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
        # DINOv2 (paper §4.2: ViT-L/14 distilled), Meta's official backbone files. Meta publishes no
        # checksums; these are the sizes and sha256 of the files served at these URLs, as several
        # independent projects pin them.
        WeightSpec(
            "dinov2_vitl14", "dinov2", "vit_large_patch14_dinov2", "dinov2_vitl14_pretrain.pth",
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
            "d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428", 1161, "Meta AI, DINOv2",
            1_217_586_395,
        ),
        WeightSpec(
            "dinov2_vits14", "dinov2", "vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth",
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
            "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9", 84, "Meta AI, DINOv2",
            88_283_115,
        ),
    ]
}


class MissingWeightsError(RuntimeError):
    """A checkpoint is needed but not on disk and cannot be downloaded."""


class ChecksumError(RuntimeError):
    pass


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file is there but cannot be read: truncated, empty, an HTML error page saved under
    its name, or not a checkpoint at all."""


def cache_path(spec: WeightSpec, settings: Settings) -> Path:
    return settings.weights_path / spec.filename


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def spec_for_file(path: Path) -> WeightSpec | None:
    """The registry entry whose official file name ``path`` has, if any."""
    return next((s for s in REGISTRY.values() if s.filename == Path(path).name), None)


def unreadable(path: Path, name: str | None = None) -> UnreadableCheckpointError:
    """The one message for a checkpoint that cannot be loaded: names the file and the fix."""
    path = Path(path)
    spec = REGISTRY.get(name or "") or spec_for_file(path)
    if spec is not None:
        fix = f"re-fetch with `use-search weights fetch {spec.name}`"
        if spec.size_bytes is not None and path.is_file() and path.stat().st_size != spec.size_bytes:
            fix += f" (it is {path.stat().st_size:,} bytes; the published file has {spec.size_bytes:,})"
    else:
        fix = "download it again, or pass another file"
    return UnreadableCheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): {fix}")


def _read_guard(path: Path, name: str | None) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    if size == 0:
        raise unreadable(path, name)


def torch_load(path: Path, name: str | None = None, *, mmap: bool = False) -> Any:
    """``torch.load`` of tensors only (no code runs from the file). Any failure to parse — truncated
    zip, HTML page, empty file, a pickle that needs arbitrary classes — is ``UnreadableCheckpointError``
    naming the file and the fix (never torch's advice to turn ``weights_only`` off)."""
    import torch

    path = Path(path)
    _read_guard(path, name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as e:
        raise unreadable(path, name) from e


def torchscript_load(path: Path, name: str | None = None) -> "torch.jit.ScriptModule":
    """OpenAI's CLIP release format. torch deprecates ``jit.load`` in favour of ``torch.export``; these
    archives exist only in this format, so the warning is silenced here."""
    import warnings

    import torch

    path = Path(path)
    _read_guard(path, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except MemoryError:
        raise
    except Exception as e:
        raise unreadable(path, name) from e


def safetensors_load(path: Path, name: str | None = None, keep: Any = None) -> "dict[str, torch.Tensor]":
    """A safetensors file's tensors (only the keys ``keep(key)`` accepts, when given)."""
    from safetensors import safe_open

    path = Path(path)
    _read_guard(path, name)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    except MemoryError:
        raise
    except Exception as e:
        raise unreadable(path, name) from e


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (a zip holding ``constants.pkl``), as OpenAI publishes CLIP."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


_identities: dict[tuple[str, int, int], str] = {}


def file_identity(path: Path, kind: Kind, arch: str) -> str:
    """What payloads record for a model loaded from a file: the registry name when the file is that
    published checkpoint (same sha256), else ``kind:arch:file name-short content digest``, so two
    files with one name, or one file under two names, are told apart."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _identities:
        digest = sha256_file(path)
        spec = next((s for s in REGISTRY.values() if s.kind == kind and s.sha256 == digest), None)
        _identities[key] = spec.name if spec else f"{kind}:{arch}:{path.name}-{digest[:8]}"
    return _identities[key]


def missing_message(spec: WeightSpec, settings: Settings, reason: str = "") -> str:
    dest = cache_path(spec, settings)
    why = f" ({reason})" if reason else ""
    return (
        f"checkpoint '{spec.name}' ({spec.source}, ~{spec.size_mb} MB) is not at {dest}{why}.\n"
        f"  On a connected machine:  use-search weights fetch {spec.name}\n"
        f"  Or download {spec.url}\n"
        f"  and put it at {dest} (or point USE_SEARCH_WEIGHTS_DIR at the folder that holds {spec.filename})."
    )


TRY_TINY = (
    "Only to check that the pipeline runs, without any download: --preset tiny (small random-init "
    "networks, meaningless results)."
)


def missing_weights_error(messages: list[str]) -> MissingWeightsError:
    """One error for every checkpoint a run lacks (each message from ``missing_message``), ending with
    the way to try the pipeline without them."""
    head = f"this run needs {len(messages)} checkpoint(s) that are not here:\n" if len(messages) > 1 else ""
    return MissingWeightsError(head + "\n".join(messages) + "\n" + TRY_TINY)


def download_size(specs: list[WeightSpec]) -> str:
    """Their total size for a person: ``"2.8 GB"``, ``"375 MB"`` (registry sizes)."""
    mb = sum(s.size_mb for s in specs)
    return f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb} MB"


def resolve(name_or_path: str | Path, settings: Settings, *, download: bool = True) -> Path:
    """A local file path, or the cached file of a registry name (downloading it if allowed and online)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    spec = REGISTRY.get(str(name_or_path))
    if spec is None:
        if p.exists():
            raise FileNotFoundError(f"checkpoint {p} is not a file")
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
    """Download ``spec`` into the cache with a progress bar; verify size and sha256; move into place
    atomically. Offline it never touches the network.

    A network failure is a ``MissingWeightsError`` that says where to put the file by hand."""
    if settings.is_offline:
        raise MissingWeightsError(missing_message(spec, settings, "offline mode: not downloading"))
    import httpx
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    dest = cache_path(spec, settings)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + f".part{os.getpid()}")
    h = hashlib.sha256()
    size = 0
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
                    size += len(block)
                    bar.advance(task, len(block))
        if spec.size_bytes is not None and size != spec.size_bytes:
            raise ChecksumError(
                f"checksum mismatch: {spec.url} downloaded {size:,} bytes, the published file has "
                f"{spec.size_bytes:,}; file discarded"
            )
        if spec.sha256 is not None and h.hexdigest() != spec.sha256:
            raise ChecksumError(
                f"checksum mismatch: {spec.url} downloaded with sha256 {h.hexdigest()}, expected {spec.sha256}; "
                "file discarded"
            )
        os.replace(part, dest)
        return dest
    except (httpx.HTTPError, OSError) as e:
        raise MissingWeightsError(missing_message(spec, settings, f"download failed: {e}")) from e
    finally:
        part.unlink(missing_ok=True)


def verify(spec: WeightSpec, settings: Settings) -> tuple[bool, str]:
    """(ok, message) for the cached file of ``spec``: its size, then its sha256, where published."""
    dest = cache_path(spec, settings)
    if not dest.is_file():
        return False, f"missing: {dest}"
    size = dest.stat().st_size
    if spec.size_bytes is not None and size != spec.size_bytes:
        return False, (
            f"checksum mismatch: {dest} is {size:,} bytes, the published file has {spec.size_bytes:,} "
            f"(truncated or not this checkpoint): re-fetch with `use-search weights fetch {spec.name}`"
        )
    if spec.sha256 is None:
        return True, f"present (no published checksum): {dest}"
    got = sha256_file(dest)
    if got != spec.sha256:
        return False, (
            f"checksum mismatch: {dest} has sha256 {got}, expected {spec.sha256}: "
            f"re-fetch with `use-search weights fetch {spec.name}`"
        )
    return True, f"ok: {dest}"
