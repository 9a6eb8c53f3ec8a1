"""Typed settings: the one place for defaults.

Sources, highest priority first: explicit keyword arguments (the CLI passes its flags this way),
environment variables ``USE_SEARCH_*`` (nested with ``__``, e.g. ``USE_SEARCH_AMG__POINTS_PER_SIDE``),
the TOML file named by ``USE_SEARCH_CONFIG`` (default ``<config dir>/config.toml`` when it exists),
then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

APP = "use-search"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def default_config_file() -> Path:
    return Path(os.environ.get("USE_SEARCH_CONFIG", Path(platformdirs.user_config_dir(APP)) / "config.toml"))


class AutoMaskSettings(BaseModel):
    """Automatic mask generation from a grid of point prompts (segment-anything's defaults).

    The paper (§4.1) lowers both thresholds to 0.6 for curation to get more segments; for indexing we
    keep SAM's defaults. ``None`` means "the preset decides" (the tiny preset relaxes them because its
    random weights never reach SAM's confidence levels).
    """

    points_per_side: int | None = None
    points_per_batch: int = 64
    pred_iou_thresh: float | None = None
    stability_score_thresh: float | None = None
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    min_mask_region_area: int = 0
    # "batched": BatchedAutoSegmenter (same masks, built for GPU throughput; crop_n_layers=0 only);
    # "reference": segment-anything's SamAutomaticMaskGenerator loop.
    engine: Literal["batched", "reference"] = "batched"


class BoxPromptSettings(BaseModel):
    """Box prompts → masks (paper §3.1)."""

    whole_image_box_fraction: float = 0.9  # a box over 90% of the image becomes the whole-image mask
    min_hole_area: int = 100  # fill holes smaller than this (pixels)
    min_island_area: int = 100  # drop islands smaller than this (pixels)


class StoreSettings(BaseModel):
    backend: Literal["embedded", "server"] = "embedded"
    path: Path | None = None  # embedded store folder; default <data_dir>/store
    url: str | None = None  # server backend, e.g. http://localhost:6333
    api_key: str | None = None
    collection: str = "segments"
    timeout_s: float = 10.0
    # Qdrant cluster (server backend), applied when the collections are created; None: the server's
    # default. See docs/deploy.md.
    shard_number: int | None = Field(default=None, ge=1)  # segments collection (image records: 1 shard)
    replication_factor: int | None = Field(default=None, ge=1)  # copies of every shard, both collections
    write_consistency_factor: int | None = Field(default=None, ge=1)  # replicas that must ack a write

    @model_validator(mode="after")
    def _consistency_within_replicas(self) -> "StoreSettings":
        w, r = self.write_consistency_factor, self.replication_factor
        if w is not None and w > (r or 1):
            raise ValueError(f"store.write_consistency_factor ({w}) exceeds store.replication_factor ({r or 1})")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="USE_SEARCH_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    data_dir: Path = Field(default_factory=default_data_dir)
    weights_dir: Path | None = None  # default <data_dir>/weights
    preset: Literal["paper", "base", "tiny"] = "paper"
    use_checkpoint: Path | None = None  # trained USE head; when unset the crop-CLIP baseline embeds
    device: str = "auto"  # "auto" picks CUDA when present
    offline: bool = False  # never try a download (also implied by HF_HUB_OFFLINE=1)

    batch_images: int = 4  # images per upsert batch
    embed_batch: int = 64  # segment crops per CLIP forward (crop-CLIP baseline)
    max_image_pixels: int = 50_000_000  # decompression-bomb guard
    image_extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

    api_key: str | None = None  # HTTP API key: clients send header X-API-Key (env USE_SEARCH_API_KEY)
    max_upload_bytes: int = 20 * 1024 * 1024  # POST /images and /segment uploads; larger → 413

    amg: AutoMaskSettings = AutoMaskSettings()
    box: BoxPromptSettings = BoxPromptSettings()
    store: StoreSettings = StoreSettings()

    @field_validator("data_dir", "weights_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = default_config_file()
        if toml.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    # Derived locations -------------------------------------------------------------------------
    @property
    def weights_path(self) -> Path:
        return self.weights_dir or self.data_dir / "weights"

    @property
    def store_path(self) -> Path:
        return self.store.path or self.data_dir / "store"

    @property
    def is_offline(self) -> bool:
        return self.offline or os.environ.get("HF_HUB_OFFLINE") == "1"

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
