"""Checkpoint files in the official formats, with random weights, and their corrupt variants; a store
left by an index run with a given model. Shared by test_weights.py and test_query_path.py."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

HTML_PAGE = b"<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def run_cli(args: list[str], data_dir: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m use_search ARGS`` as a user runs it, in a fresh process."""
    full_env = {**os.environ, "USE_SEARCH_DATA_DIR": str(data_dir), "COLUMNS": "250", "USE_SEARCH_CONFIG": "/nonexistent", **env}
    return subprocess.run([sys.executable, "-m", "use_search", *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def corrupt(good: Path, variant: str, dest: Path) -> Path:
    """``truncated`` (the first half of a good file), ``html`` (an error page saved under the name) or
    ``empty``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = {"truncated": good.read_bytes()[: good.stat().st_size // 2], "html": HTML_PAGE, "empty": b""}[variant]
    dest.write_bytes(data)
    return dest


def sam_file(path: Path, arch: str = "tiny", seed: int = 1) -> Path:
    """A SAM checkpoint as segment-anything publishes them: the plain state dict of ``Sam``."""
    from use_search.segmenter.sam import build_sam

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_sam(arch).state_dict(), path)
    return path


def dinov2_meta_state(arch: str = "vit_small_patch14_dinov2", seed: int = 2) -> dict[str, torch.Tensor]:
    """Meta's DINOv2 ``*_pretrain.pth`` layout: the backbone at 518 px (37×37 position grid) plus the
    ``mask_token`` of iBOT training."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=518)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    return state


def _tiny_openai_clip(seed: int):  # type: ignore[no-untyped-def]
    """open_clip's tiny CLIP with random weights and OpenAI's three integer attributes as buffers (they
    are in OpenAI's archives and in state dicts saved from them)."""
    from use_search.model.clip import TINY_CLIP, build_clip

    torch.manual_seed(seed)
    model = build_clip(TINY_CLIP).eval()
    for p in model.parameters():  # open_clip's init leaves zeros/ones in places; fill every weight
        p.data.normal_(0, 0.05)
    for name, value in (("input_resolution", 112), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, name):
            delattr(model, name)  # open_clip keeps two of them as plain ints
        model.register_buffer(name, torch.tensor(value))
    # OpenAI's model holds the causal mask as a plain tensor (a constant in the trace), not a buffer.
    mask = model.attn_mask
    del model.attn_mask
    model.attn_mask = mask
    return model


def openai_torchscript(path: Path, seed: int = 3) -> Path:
    """OpenAI's release format: a traced TorchScript archive of the whole CLIP."""
    model = _tiny_openai_clip(seed)
    image, text = torch.zeros(1, 3, 112, 112), torch.zeros(1, 77, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates tracing; OpenAI's archives are traced
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
    return path


def openai_state_dict(path: Path, seed: int = 4, half: bool = True) -> Path:
    """A plain OpenAI-format state dict (fp16, as OpenAI ships them) that still holds
    ``input_resolution`` / ``context_length`` / ``vocab_size``."""
    model = _tiny_openai_clip(seed)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def store_indexed_with(store_dir: Path, model: str, dim: int, images: int = 2, seed: int = 0) -> None:
    """The embedded store an index run with ``model`` (``dim``-d vectors) leaves: one whole-image
    segment per image, random unit vectors, written through the store API as the indexer writes."""
    from use_search.indexer.read import LoadedImage
    from use_search.indexer.runner import now_iso, segment_points
    from use_search.masks import mask_bbox
    from use_search.store import EdgeStore
    from use_search.store.base import ImageEntry
    from use_search.types import ImageRecord, Segment

    rng = np.random.default_rng(seed)
    with EdgeStore(store_dir, "segments") as store:
        store.ensure(dim)
        for i in range(images):
            pixels = np.zeros((32, 48, 3), np.uint8)
            mask = np.zeros((32, 48), bool)
            mask[4:20, 6:30] = True
            rec = ImageRecord(path=f"/photos/img{i}.jpg", sha256=f"{i:064x}", width=48, height=32)
            loaded = LoadedImage(rec, pixels)
            vectors = rng.normal(size=(1, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            segment = Segment(mask, mask_bbox(mask), int(mask.sum()))
            store.upsert_segments(segment_points(loaded, [segment], vectors, model))
            store.put_image(ImageEntry(rec.path, rec.sha256, 48, 32, 1, model, now_iso()))


def randomize(model, seed: int = 1):  # type: ignore[no-untyped-def]
    """Give a USE model's trainable parts (LayerNorm γ/β, scales, projection) non-initial values, as
    after training, so tests see every part at work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + p)
    return model


def official_files(folder: Path) -> dict[str, Path]:
    """One good file per official format, random weights: a SAM state dict, a traced OpenAI CLIP
    archive and a plain OpenAI CLIP state dict."""
    return {
        "sam": sam_file(folder / "sam_custom.pth"),
        "clip_torchscript": openai_torchscript(folder / "ViT-tiny.pt"),
        "clip_openai_sd": openai_state_dict(folder / "openai_state_dict.pt"),
    }
