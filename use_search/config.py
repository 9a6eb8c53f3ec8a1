"""Typed settings: the one place for defaults.

Sources, highest priority first: explicit keyword arguments (the CLI passes its flags this way),
environment variables ``USE_SEARCH_*`` (nested with ``__``, e.g. ``USE_SEARCH_AMG__POINTS_PER_SIDE``),
the TOML file named by ``USE_SEARCH_CONFIG`` (default ``<config dir>/config.toml`` when it exists),
then the defaults below.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

if TYPE_CHECKING:
    from use_search.presets import Preset

APP = "use-search"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def default_config_file() -> Path:
    return Path(os.environ.get("USE_SEARCH_CONFIG", Path(platformdirs.user_config_dir(APP)) / "config.toml"))


def unknown_keys(data: dict, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names in ``data`` that no field of ``model`` (or its nested settings) has."""
    bad = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            bad.append(prefix + key)
        elif isinstance(value, dict) and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            bad += unknown_keys(value, field.annotation, f"{prefix}{key}.")
    return bad


def read_config_file(path: Path, model: type[BaseModel]) -> dict:
    """The settings file's table; a file that is not TOML or names a setting that does not exist
    (a typo would otherwise be ignored without a word) is an error naming the file."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"settings file {path} is unreadable: {e} (set USE_SEARCH_CONFIG to use another)") from None
    bad = unknown_keys(data, model)
    if bad:
        raise ValueError(f"settings file {path}: unknown setting(s) {', '.join(bad)} (see the README, Configuration)")
    return data


class AutoMaskParams(BaseModel):
    """Automatic mask generation from a grid of point prompts: segment-anything's
    ``SamAutomaticMaskGenerator`` settings (same names and defaults), plus ``precision``. The one
    definition of these knobs: the settings' ``amg`` block is this with the preset's three left open
    (``AutoMaskSettings``), and the segmenters take it as resolved for a preset (``for_preset``)."""

    model_config = ConfigDict(frozen=True)

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    # The batched engine's arithmetic. "exact": float32 and segment-anything's attention arithmetic,
    # segment-anything's masks up to pixels whose logit is within float32 rounding of the mask
    # threshold (segmenter/batched.py). "fast": bfloat16 encoder/decoder and float16 mask upscaling on
    # CUDA, scaled_dot_product_attention everywhere (borders and close calls move, see README).
    # "auto": fast on CUDA, exact elsewhere. The reference engine is always segment-anything's float32.
    precision: Literal["auto", "fast", "exact"] = "auto"

    @model_validator(mode="after")
    def _grid_has_points(self) -> "AutoMaskParams":
        if self.points_per_side is not None and self.points_per_side < 1:
            raise ValueError("points_per_side must be a positive integer")
        if self.crop_n_layers < 0 or self.crop_n_points_downscale_factor < 1:
            raise ValueError("crop_n_layers must be >= 0 and crop_n_points_downscale_factor >= 1")
        side = self.points_per_side
        if side is not None and side // self.crop_n_points_downscale_factor**self.crop_n_layers < 1:
            raise ValueError(
                f"the last crop layer gets no points: points_per_side {side} / "
                f"crop_n_points_downscale_factor {self.crop_n_points_downscale_factor}^{self.crop_n_layers} < 1"
            )
        return self

    @property
    def post_nms_thresh(self) -> float:
        """segment-anything's threshold for the NMS after ``min_mask_region_area`` cleaning."""
        return max(self.box_nms_thresh, self.crop_nms_thresh)


class AutoMaskSettings(AutoMaskParams):
    """The ``amg`` settings block: ``AutoMaskParams`` where ``None`` means "the preset decides" (the tiny
    preset relaxes the thresholds because its random weights never reach SAM's confidence levels), plus
    the engine. The paper (§4.1) lowers both thresholds to 0.6 for curation to get more segments; for
    indexing we keep SAM's defaults."""

    model_config = ConfigDict(frozen=False)

    points_per_side: int | None = None  # type: ignore[assignment]
    pred_iou_thresh: float | None = None  # type: ignore[assignment]
    stability_score_thresh: float | None = None  # type: ignore[assignment]
    # "batched": BatchedAutoSegmenter (built for GPU throughput); "reference": segment-anything's
    # SamAutomaticMaskGenerator loop. The same masks with precision "exact" (up to fp32 rounding).
    engine: Literal["batched", "reference"] = "batched"

    def for_preset(self, preset: Preset) -> AutoMaskParams:
        """These settings with what is left open taken from the preset."""
        return AutoMaskParams(**{
            **self.model_dump(exclude={"engine"}),
            "points_per_side": preset.points_per_side if self.points_per_side is None else self.points_per_side,
            "pred_iou_thresh": preset.pred_iou_thresh if self.pred_iou_thresh is None else self.pred_iou_thresh,
            "stability_score_thresh": (
                preset.stability_score_thresh if self.stability_score_thresh is None else self.stability_score_thresh
            ),
        })


class BoxPromptSettings(BaseModel):
    """Box prompts → masks (paper §3.1)."""

    whole_image_box_fraction: float = 0.9  # a box over 90% of the image becomes the whole-image mask
    min_hole_area: int = 100  # fill holes smaller than this (pixels)
    min_island_area: int = 100  # drop islands smaller than this (pixels)


class WeightedModel(BaseModel):
    """One USE checkpoint of a voting ensemble and its weight (paper A.2). Written ``PATH[:WEIGHT]``
    on the command line and in TOML / env lists; the weight defaults to 1."""

    path: Path
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, v: object) -> object:
        if isinstance(v, (str, Path)):
            return cls.parse_spec(str(v))
        return v

    @staticmethod
    def parse_spec(spec: str) -> dict[str, object]:
        """``PATH[:WEIGHT]``: the text after the last ``:`` is a weight only when it reads as a number
        and the whole text is not an existing file (so ``C:\\m.safetensors`` or ``a:b`` stay paths)."""
        spec = spec.strip()
        head, sep, tail = spec.rpartition(":")
        if sep and head and not Path(spec).expanduser().exists():
            try:
                return {"path": Path(head).expanduser(), "weight": float(tail)}
            except ValueError:
                pass
        return {"path": Path(spec).expanduser()}


class VotingSettings(BaseModel):
    """Semantic segmentation by voting (paper §4.3): ``segment``, ``eval semseg|parts`` and HTTP
    ``/segment``. Indexing and search use one model (``use_checkpoint``): a store holds one vector space."""

    # Several USE checkpoints whose class probabilities are combined per segment before the vote
    # (A.2: curated-data model 1, COCO-ground-truth model 0.7 on PC-59, 0.25 elsewhere).
    # Empty: the one configured model (``use_checkpoint``, else crop-CLIP).
    models: list[WeightedModel] = []
    # "ovseg" (A.2, "same as OVSeg"): p₀^(1-λ) · p₁^λ with λ = the second model's weight relative to the
    # first (``voting.combine.ovseg_exponents``), not renormalised; "mean": Σ wᵢpᵢ / Σ wᵢ;
    # "geometric": Π pᵢ^(wᵢ/Σ w), renormalised per segment.
    combine: Literal["ovseg", "mean", "geometric"] = "ovseg"
    templates: str = "imagenet80"  # a named set (train4, imagenet80) or a file, one template per line
    logit_scale: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # None: each model's training scale (CLIP: 100)
    # Pixels no segment covers: the "nearest" labelled pixel's class, the whole "image"'s class (taken
    # as one more segment; covered pixels keep their vote), or "none" (unlabeled: a miss in eval).
    # None: "nearest" for segment and /segment, "none" for eval semseg (§4.3 says nothing of them).
    fallback: Literal["nearest", "image", "none"] | None = None

    @field_validator("models", mode="after")
    @classmethod
    def _distinct(cls, v: list[WeightedModel]) -> list[WeightedModel]:
        paths = [m.path.expanduser().absolute() for m in v]
        if len(set(paths)) != len(paths):
            raise ValueError("an ensemble lists the same checkpoint twice: give each once, with its weight")
        return v

    @model_validator(mode="after")
    def _ovseg_weights(self) -> "VotingSettings":
        if self.combine == "ovseg" and len(self.models) > 1:
            from use_search.voting.combine import ovseg_exponents  # numpy: deferred, settings load first

            ovseg_exponents([m.weight for m in self.models])
        return self


class TrainSettings(BaseModel):
    """Training the USE head (``use-search train``); the rest of the recipe (§4.2) is ``train.TrainConfig``."""

    # Eq. (1) takes every other text of the batch as a negative, even one equal to the pair's own (two
    # "person" segments, common with COCO's category names as texts). On: such pairs are left out of
    # each other's softmax, so a segment is never pushed away from a text that describes it (a
    # deviation from eq. 1, see docs/notes-model.md). Off: eq. (1) as written.
    mask_same_text: bool = True


class QuerySettings(BaseModel):
    """The query forms of ``use_search.query.forms`` (more like this, negatives, --all, --group)."""

    # --all: each phrase's candidate set is its this-many best segments (one batched engine query); an
    # image is found only when every phrase has a segment of it among that phrase's candidates.
    all_candidates: int = Field(default=1000, ge=1, le=100_000)
    max_phrases: int = Field(default=8, ge=1)  # --all / --none / --not / like examples, each at most this many
    per_image: int = Field(default=3, ge=1)  # --group image: best segments listed per image


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
    # Embedded store. A write (or creating the store) stops with a clear error while the disk still has
    # this much free: qdrant-edge writes through mmap, so running out of space would kill the process.
    min_free_mb: int = Field(default=16, ge=0)
    # Largest engine segment: a run's new points get their own HNSW graph (or join the smallest one
    # under the cap) instead of rebuilding the whole collection's, and a large write builds each time
    # this many MB of float vectors are written, so the build's memory stays near it (store/build.py).
    # Larger: fewer segments to search (faster), more memory per build (docs/benchmarks.md, "Stores
    # at scale"). None: no cap (qdrant's default, CPUs × 256 MB, for merges only).
    max_segment_mb: int | None = Field(default=128, ge=1)
    # Below this many KB of new vectors the engine leaves them unindexed (scanned exactly). None: qdrant's default.
    indexing_threshold_kb: int | None = Field(default=None, ge=1)
    # How the segments collection holds its vectors and payloads (store/layout.py; docs/benchmarks.md,
    # "Stores at scale"). Fixed when a store is created and recorded with it; None: the store's own
    # (a new store: turbo4, vectors and payloads on disk). Given and different from the store's: an error.
    quantization: Literal["none", "int8", "binary", "turbo4"] | None = None
    vectors_on_disk: bool | None = None  # float vectors on disk (mmap); quantized ones stay in RAM
    payload_on_disk: bool | None = None  # payloads (with the masks) on disk, read for the hits only
    # Every search of a quantized store: rescore the candidates with the float vectors, and how many
    # candidates (× k) the quantized index proposes.
    rescore: bool = True
    oversampling: float = Field(default=2.0, ge=1.0, le=16.0)

    @model_validator(mode="after")
    def _consistency_within_replicas(self) -> "StoreSettings":
        w, r = self.write_consistency_factor, self.replication_factor
        if w is not None and w > (r or 1):
            raise ValueError(f"store.write_consistency_factor ({w}) exceeds store.replication_factor ({r or 1})")
        return self


class ApiSettings(BaseModel):
    """``use-search serve``: limits and the browser-facing policy (env ``USE_SEARCH_API__*``)."""

    max_body_bytes: int = Field(default=64 * 1024, ge=1024)  # JSON bodies (POST /search); larger → 413
    max_pixels: int = Field(default=50_000_000, ge=1)  # per request: an upload with more pixels → 413
    overlay_side: int = Field(default=2048, ge=16)  # overlay PNGs are drawn at most this long side
    worker_queue: int = Field(default=4, ge=0)  # heavy jobs (segment, upload-index) that may wait; more → 503
    worker_timeout_s: float = Field(default=300.0, gt=0)  # a heavy job running longer is stopped → 503
    worker_startup_timeout_s: float = Field(default=600.0, gt=0)  # loading the models in the worker
    worker_nice: int = Field(default=10, ge=0, le=19)  # the worker's CPU priority below the server's
    cors_origins: list[str] = []  # browser origins allowed to call the API from other pages; none by default
    # Host headers accepted (DNS rebinding); None: loopback names when serving on a loopback address.
    allowed_hosts: list[str] | None = None
    # Connections (docs/deploy.md): open connections and requests at once (uvicorn's limit_concurrency;
    # at the limit a new connection replaces the oldest one still waiting for its request headers);
    # an idle kept-alive connection closes after timeout_keep_alive_s; the request line and headers
    # must arrive within header_timeout_s; a body that sends nothing for body_timeout_s is cut.
    limit_concurrency: int = Field(default=512, ge=2)
    timeout_keep_alive_s: int = Field(default=5, ge=1)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="USE_SEARCH_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    data_dir: Path = Field(default_factory=default_data_dir)
    weights_dir: Path | None = None  # default <data_dir>/weights
    # "auto": paper where CUDA is available, base elsewhere (presets.resolve prints which, once)
    preset: Literal["auto", "paper", "base", "tiny"] = "auto"
    use_checkpoint: Path | None = None  # trained USE head; when unset the crop-CLIP baseline embeds
    # Models instead of the preset's (env USE_SEARCH_SAM / _CLIP / _DINOV2): a registry name
    # (`use-search weights list`) or a checkpoint file; CLIP and DINOv2 also take ARCH:FILE.
    sam: str | None = None
    clip: str | None = None
    dinov2: str | None = None
    device: str = "auto"  # "auto" picks CUDA when present
    offline: bool = False  # never try a download (also implied by HF_HUB_OFFLINE=1)

    batch_images: int = 4  # images per upsert batch
    decode_threads: int = Field(default=4, ge=1)  # indexer: threads reading, hashing and decoding files
    index_pipeline: bool = True  # indexer: decode ‖ segment+embed ‖ write; False: the sequential reference
    embed_batch: int = 64  # segment crops per CLIP forward (crop-CLIP baseline)
    max_image_pixels: int = 50_000_000  # decompression-bomb guard
    # Images (indexed files and uploads) are segmented and embedded with their long side at most this
    # (SAM never sees more than its input size); stored masks are mapped back to the original size.
    # None: the segmenter's input size (1024 px for SAM); 0: full resolution.
    work_side: int | None = Field(default=None, ge=0)
    image_extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

    api_key: str | None = None  # HTTP API key: clients send header X-API-Key (env USE_SEARCH_API_KEY)
    max_upload_bytes: int = 20 * 1024 * 1024  # POST /images and /segment uploads; larger → 413
    api: ApiSettings = ApiSettings()

    amg: AutoMaskSettings = AutoMaskSettings()
    box: BoxPromptSettings = BoxPromptSettings()
    store: StoreSettings = StoreSettings()
    query: QuerySettings = QuerySettings()
    voting: VotingSettings = VotingSettings()
    train: TrainSettings = TrainSettings()

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
        if toml.exists():
            sources.append(InitSettingsSource(settings_cls, init_kwargs=read_config_file(toml, settings_cls)))
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
