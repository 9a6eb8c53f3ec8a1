"""How a segments collection is laid out: vector quantization, what lives on disk, and how a search
uses the quantized vectors. One description for both backends (``EdgeStore``, ``ServerStore``).

Creation-time choices (``quantization``, ``vectors_on_disk``, ``payload_on_disk``) are the store's
own: an embedded store records them in ``layout.json`` next to its shards, a server collection in its
collection config. A setting left unset (None) takes the store's recorded value, or for a new store
the default below; a setting given that differs from the store's is a ``StoreError`` naming both, not
a silent mismatch. Search-time choices (``rescore``, ``oversampling``) apply to every search.

Defaults (measured, docs/benchmarks.md, "Stores at scale"): turbo4 (4-bit codes) found the exact top
10 with rescoring and oversampling 2 at 100k and 300k points, with the smallest reader memory of the
settings that did (int8 the same recall, ~20% more memory; binary lost recall); the float vectors and
the payloads (masks) go to disk, read only to rescore the few candidates and for the hits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from use_search.store.base import StoreError

Quantization = Literal["none", "int8", "binary", "turbo4"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "binary", "turbo4")
LAYOUT_FILE = "layout.json"
SERVER_METADATA_KEY = "use_search_layout"  # the server collection's record, in its metadata
# A store written before layouts were recorded: floats in RAM, the engine's payload default.
LEGACY = {"quantization": "none", "vectors_on_disk": False, "payload_on_disk": None}


@dataclass(frozen=True)
class Layout:
    quantization: str = "turbo4"
    vectors_on_disk: bool = True
    payload_on_disk: bool | None = True  # None: the engine's default (stores written before layouts)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


@dataclass(frozen=True)
class SearchTuning:
    rescore: bool = True  # rescore the quantized candidates with the float vectors
    oversampling: float = 2.0  # candidates fetched from the quantized index per hit asked for


def requested(settings: Any) -> dict[str, Any]:
    """The creation-time settings the user gave (``StoreSettings``): None means "the store's own"."""
    return {k: getattr(settings, k) for k in ("quantization", "vectors_on_disk", "payload_on_disk")
            if getattr(settings, k) is not None}


def resolve(recorded: dict[str, Any] | None, wanted: dict[str, Any], where: str) -> Layout:
    """The layout to use: the store's (``recorded``; None for a new store: the defaults and ``wanted``),
    after checking that every setting in ``wanted`` agrees with it."""
    if recorded is None:
        return Layout(**wanted)
    differ = {k: (recorded.get(k), v) for k, v in wanted.items() if recorded.get(k) != v}
    if differ:
        lines = ", ".join(f"store.{k} = {old} in the store, {new} asked" for k, (old, new) in differ.items())
        raise StoreError(
            f"{where} was created with other store settings ({lines}): leave these settings unset to use the "
            "store's own, or index into a new collection (--collection NAME) to get the new ones"
        )
    return Layout(**{k: recorded.get(k, Layout.__dataclass_fields__[k].default) for k in asdict(Layout())})


def read_recorded(root: Path) -> dict[str, Any] | None:
    """The layout an embedded store recorded; ``LEGACY`` for a store that has shards but no record."""
    file = root / LAYOUT_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {file}: {e}") from None


def write_recorded(root: Path, layout: Layout) -> None:
    tmp = root / (LAYOUT_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(layout), indent=1) + "\n")
    tmp.replace(root / LAYOUT_FILE)


# qdrant-edge --------------------------------------------------------------------------------------
def edge_vectors(layout: Layout, dim: int) -> Any:
    import qdrant_edge as qe

    return qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine, on_disk=layout.vectors_on_disk or None)


def edge_quantization(layout: Layout) -> Any:
    import qdrant_edge as qe

    # Quantized vectors stay in RAM: they are what the index walks; the floats are read only to rescore.
    return {
        "none": lambda: None,
        "int8": lambda: qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=0.99, always_ram=True),
        "binary": lambda: qe.BinaryQuantizationConfig(always_ram=True),
        "turbo4": lambda: qe.TurboQuantQuantizationConfig(always_ram=True, bits=qe.TurboQuantBitSize.Bits4),
    }[layout.quantization]()


def edge_search_params(layout: Layout, tuning: SearchTuning) -> Any:
    import qdrant_edge as qe

    if layout.quantization == "none":
        return None
    return qe.SearchParams(quantization=qe.QuantizationSearchParams(rescore=tuning.rescore, oversampling=tuning.oversampling))


# Qdrant server (qdrant-client) --------------------------------------------------------------------
def server_create_options(layout: Layout, dim: int) -> dict[str, Any]:
    from qdrant_client import models

    quantization = {
        "none": lambda: None,
        "int8": lambda: models.ScalarQuantization(
            scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, quantile=0.99, always_ram=True)
        ),
        "binary": lambda: models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True)),
        "turbo4": lambda: models.TurboQuantization(
            turbo=models.TurboQuantQuantizationConfig(always_ram=True, bits=models.TurboQuantBitSize.BITS4)
        ),
    }[layout.quantization]()
    return {
        "vectors_config": models.VectorParams(size=dim, distance=models.Distance.COSINE, on_disk=layout.vectors_on_disk),
        "quantization_config": quantization,
        "on_disk_payload": layout.payload_on_disk,
        "metadata": {SERVER_METADATA_KEY: asdict(layout)},
    }


def server_recorded(info: Any) -> dict[str, Any]:
    """The layout a server collection was created with: its metadata's record, else (a collection made
    before layouts, or by hand) what its config says."""
    record = (getattr(info.config, "metadata", None) or {}).get(SERVER_METADATA_KEY)
    if record:
        return dict(record)
    q = info.config.quantization_config
    kind = "none"
    if q is not None:
        name = type(q).__name__
        kind = {"ScalarQuantization": "int8", "BinaryQuantization": "binary", "TurboQuantization": "turbo4"}.get(name, name)
    vectors = info.config.params.vectors
    return {
        "quantization": kind,
        "vectors_on_disk": bool(getattr(vectors, "on_disk", False)),
        "payload_on_disk": bool(info.config.params.on_disk_payload),
    }


def server_search_params(layout: Layout, tuning: SearchTuning) -> Any:
    from qdrant_client import models

    if layout.quantization == "none":
        return None
    return models.SearchParams(
        quantization=models.QuantizationSearchParams(rescore=tuning.rescore, oversampling=tuning.oversampling)
    )
