"""Load Hugging Face models (Grounding DINO, MLLM captioners) by model id or local folder.

A model that is neither a local folder nor in the Hugging Face cache, offline, is a
``MissingWeightsError`` that says what to fetch: never random weights in its place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from use_search.weights import MissingWeightsError


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def load_pretrained(name_or_path: str, model_cls: Any, *, offline: bool, what: str, **kwargs: Any) -> tuple[Any, Any]:
    """(model, processor) from a local folder, the Hugging Face cache, or (online) the Hub.

    The cache is tried first so that a cached model loads without touching the network.
    """
    if looks_like_path(name_or_path):
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            raise MissingWeightsError(
                f"{what}: no model folder at {folder}. Put a saved Hugging Face model there "
                "(`save_pretrained` output: config.json, weights, processor and tokenizer files)."
            )
        return _load(str(folder), model_cls, what=what, local_files_only=True, **kwargs)
    try:
        return _load(name_or_path, model_cls, what=what, local_files_only=True, **kwargs)
    except MissingWeightsError:
        if offline:
            raise
    return _load(name_or_path, model_cls, what=what, local_files_only=False, **kwargs)


def _load(name: str, model_cls: Any, *, what: str, local_files_only: bool, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name, local_files_only=local_files_only)
        model = model_cls.from_pretrained(name, local_files_only=local_files_only, **kwargs)
    except OSError as e:
        problem = "is not in the Hugging Face cache (offline)" if local_files_only else "could not be downloaded"
        raise MissingWeightsError(
            f"{what} '{name}' {problem}: {str(e).splitlines()[0]}\n"
            f"  On a connected machine:  hf download {name}   (fills the cache, HF_HOME)\n"
            f"  or save the model with save_pretrained() and pass its folder instead of '{name}'."
        ) from e
    return model.eval(), processor
