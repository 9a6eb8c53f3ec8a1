"""Load Hugging Face models (Grounding DINO, MLLM captioners) by model id or local folder.

A model that is neither a local folder nor in the Hugging Face cache, offline, is a
``MissingWeightsError`` that says what to fetch: never random weights in its place. A checkpoint that
ships its own Python code (``auto_map`` in its config, e.g. CogVLM) loads only with
``trust_remote_code=True`` (``--trust-remote-code``); without it, a ``RemoteCodeError`` names the flag.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from use_search.weights import MissingWeightsError

TRUST_REMOTE_CODE_FLAG = "--trust-remote-code"


class RemoteCodeError(ValueError):
    """The checkpoint needs its own code to load, and running it was not allowed."""


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def load_pretrained(
    name_or_path: str,
    model_cls: Any | Sequence[Any],
    *,
    offline: bool,
    what: str,
    processor: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """(model, processor) from a local folder, the Hugging Face cache, or (online) the Hub.

    ``model_cls``: an auto class, or several tried in order (the first that knows the config wins).
    ``processor``: load the processor (or tokenizer) from this id or folder instead of the model's.
    The cache is tried first so that a cached model loads without touching the network.
    """
    classes = tuple(model_cls) if isinstance(model_cls, (list, tuple)) else (model_cls,)
    names = [name_or_path] + ([processor] if processor else [])
    for name in names:
        if looks_like_path(name) and not Path(name).expanduser().is_dir():
            raise MissingWeightsError(
                f"{what}: no model folder at {Path(name).expanduser()}. Put a saved Hugging Face model there "
                "(`save_pretrained` output: config.json, weights, processor and tokenizer files)."
            )
    kw = dict(what=what, processor=processor, trust_remote_code=trust_remote_code, **kwargs)
    try:
        return _load(name_or_path, classes, local_files_only=True, **kw)
    except MissingWeightsError as e:
        if offline or all(looks_like_path(n) for n in names):
            raise
        host = hub_host()
        # The Hub client would retry for ~30 s before saying the same. (Behind a proxy a direct
        # connection proves nothing: leave it to the client.)
        proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
        if not proxied and not reachable(host):
            raise MissingWeightsError(
                str(e).replace("is not in the Hugging Face cache (offline)",
                               f"is not in the Hugging Face cache and {host} cannot be reached (offline?)", 1)
            ) from None
    return _load(name_or_path, classes, local_files_only=False, **kw)


def hub_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` (DNS included)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load(
    name: str, classes: tuple[Any, ...], *, what: str, local_files_only: bool, processor: str | None,
    trust_remote_code: bool, **kwargs: Any,
) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoProcessor

    folder = str(Path(name).expanduser()) if looks_like_path(name) else name
    proc_name = processor or name
    proc_folder = str(Path(proc_name).expanduser()) if looks_like_path(proc_name) else proc_name
    # Explicit False: transformers would otherwise prompt on a terminal before refusing.
    remote = dict(local_files_only=local_files_only, trust_remote_code=trust_remote_code)
    current = name
    try:
        config = AutoConfig.from_pretrained(folder, **remote)
        current = proc_name
        proc = AutoProcessor.from_pretrained(proc_folder, **remote)
        current = name
        model = _from_pretrained(folder, classes, config, what=what, **remote, **kwargs)
    except OSError as e:
        problem = "is not in the Hugging Face cache (offline)" if local_files_only else "could not be downloaded"
        raise MissingWeightsError(
            f"{what} '{current}' {problem}: {str(e).splitlines()[0]}\n"
            f"  On a connected machine:  hf download {current}   (fills the cache, HF_HOME)\n"
            f"  or save the model with save_pretrained() and pass its folder instead of '{current}'."
        ) from e
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise RemoteCodeError(
            f"{what} '{current}' ships its own Python code (auto_map in its config), which transformers must run "
            f"to load it. Pass {TRUST_REMOTE_CODE_FLAG} to allow that: the code runs with your user's rights, "
            "so read its .py files first and use it only for a source you trust."
        ) from e
    return model.eval(), proc


def _from_pretrained(folder: str, classes: tuple[Any, ...], config: Any, *, what: str, **kwargs: Any) -> Any:
    unknown = []
    for cls in classes:
        try:
            return cls.from_pretrained(folder, config=config, **kwargs)
        except ValueError as e:
            if "Unrecognized configuration class" not in str(e):
                raise
            unknown.append(cls.__name__)
    raise ValueError(
        f"{what} '{folder}': its config ({type(config).__name__}) fits none of {', '.join(unknown)}: "
        "not a model this loader can caption with"
    )
