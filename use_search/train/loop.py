"""Training loop for the USE model (paper §3.2 loss, §4.2 recipe): ``run(TrainConfig)``.

Single process: ``run(config)``. Several GPUs: ``torchrun --nproc-per-node N <script calling run>``;
each rank then takes ``batch_size / N`` images of every global batch, and the loss is computed over
the segments of all ranks (all-gather), as if one process held the whole batch.

Out folder: ``epoch-NNN.safetensors`` after every epoch and ``last.safetensors`` (USE checkpoints,
usable as ``--model``), ``train_state.pt`` (step and optimizer state, for ``resume``),
``metrics.jsonl`` (per-step loss / lr / throughput and per-epoch held-out recall@k).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from use_search.config import Settings
from use_search.model.checkpoint import read_use_checkpoint
from use_search.model.text import TRAINING_TEMPLATES, TextEncoder
from use_search.model.backbones import BackboneFeatures
from use_search.model.use import UseEmbedder, UseModel, build_use_model
from use_search.presets import preset_for
from use_search.train.data import Batch, DataSpec, EpochBatches, PairDataset, PairImage, collate, feature_path, load_pairs
from use_search.train.evaluate import evaluate_retrieval
from use_search.train.loss import global_contrastive_loss, text_ids


@dataclass
class TrainConfig:
    """Defaults are the paper's recipe (§4.2) unless noted."""

    train: Sequence[DataSpec]
    out_dir: Path
    preset: str = "paper"
    val: Sequence[DataSpec] = ()  # held-out pairs for recall@k after every epoch
    val_fraction: float = 0.0  # without ``val``: hold out this fraction of the training images
    grid: int | None = None  # patch grid; None → the preset's (paper: 40)
    lln_dim: int | None = None  # None → CLIP width
    crop: int | None = None  # crop side in pixels; None → grid × CLIP patch (paper: 40 × 14 = 560)
    epochs: int = 5
    batch_size: int = 32  # images per global batch; all their segments enter the loss
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW
    poly_power: float = 0.9  # lr × (1 - step / total) ** power
    logit_scale: float = 30.0  # the paper's "τ = 30" (see loss.py)
    # Same-text pairs are not each other's negatives (not eq. 1 as written, see loss.py). None: the
    # setting ``train.mask_same_text`` (on).
    mask_same_text: bool | None = None
    augment: bool = True  # random resize in scale_range + random crop
    scale_range: tuple[float, float] = (0.5, 2.0)
    max_segments_per_image: int = 32  # not in the paper: bounds k per image (random subset each step)
    min_visible: float = 0.5  # not in the paper: drop segments with < this many patches of area in the crop
    feature_cache: Path | None = None  # cache frozen backbone features here (needs augment=False)
    max_steps: int | None = None  # stop after this many steps in total (smoke runs); resumable
    resume: bool = False  # continue from out_dir/train_state.pt
    seed: int = 0
    workers: int = 4
    amp: bool | None = None  # bf16 autocast; None → on CUDA only
    eval_ks: tuple[int, ...] = (1, 5, 10)
    eval_at_start: bool = True  # also score the untrained head, so the curve starts at step 0
    log_every: int = 10
    progress: bool = True
    device: str | None = None  # None → Settings.torch_device(); under torchrun cuda:LOCAL_RANK


# Fields that may change between a run and its resumption (they do not change the trajectory).
RESUME_FREE = {"out_dir", "val", "val_fraction", "max_steps", "resume", "workers", "progress", "log_every",
               "device", "eval_ks", "eval_at_start"}


@dataclass
class TrainResult:
    step: int  # steps done in total (including before a resume)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of this run
    evals: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None  # last.safetensors


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * max(0.0, 1.0 - step / total) ** power


def split_holdout(images: Sequence[PairImage], fraction: float, seed: int) -> tuple[list[PairImage], list[PairImage]]:
    n_val = int(round(len(images) * fraction))
    order = np.random.default_rng([seed, 7]).permutation(len(images))
    held = set(order[:n_val].tolist())
    return [im for i, im in enumerate(images) if i not in held], [im for i, im in enumerate(images) if i in held]


def _json_ready(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return {k: _json_ready(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def resume_key(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in _json_ready(config).items() if k not in RESUME_FREE}


class TextBank:
    """Frozen CLIP text embeddings (mean over the 4 training templates, §4.2), computed once per
    distinct text: the text tower is frozen, so a text's embedding never changes during training."""

    def __init__(self, encoder: TextEncoder, device: str, amp: bool, max_cached: int = 500_000) -> None:
        self.encoder, self.device, self.amp, self.max_cached = encoder, device, amp, max_cached
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            if len(self.cache) + len(new) > self.max_cached:
                self.cache.clear()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                emb = torch.from_numpy(self.encoder.encode(new, TRAINING_TEMPLATES))
            self.cache.update(zip(new, emb.half()))
        if not texts:
            return torch.zeros(0, self.encoder.clip.dim, device=self.device)
        return torch.stack([self.cache[t] for t in texts]).to(self.device, torch.float32)


@dataclass
class _Dist:
    rank: int
    world: int
    device: str
    owns_group: bool

    @classmethod
    def setup(cls, config: TrainConfig, settings: Settings) -> "_Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, config.device or settings.torch_device(), False)
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and (config.device or "cuda").startswith("cuda")
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local)
        return cls(rank, world, f"cuda:{local}" if cuda else "cpu", owns)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def contrastive_step(
    model: UseModel, trainable: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
    txt: torch.Tensor, ids: torch.Tensor, *, logit_scale: float, amp: bool, world: int = 1, mask_same_text: bool = True,
) -> float:
    """One optimisation step on a batch: frozen towers (or cached features) → trainable parts →
    eq. (1) over the segments of all ranks → AdamW. ``trainable`` is ``model.trainable`` or its DDP
    wrapper; ``txt``/``ids`` are the batch texts' embeddings and ids. Returns the loss."""
    dev = txt.device
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        if batch.features is not None:
            feats = BackboneFeatures.stack(batch.features).to(dev, torch.float32)
        else:
            feats = model.backbones(batch.images.to(dev, non_blocking=True).float() / 255.0)
        emb = trainable(feats, batch.weights.to(dev, non_blocking=True))
    seg = emb[batch.valid.to(dev)]
    loss = global_contrastive_loss(seg, txt, ids, logit_scale, mask_same_text)
    optimizer.zero_grad(set_to_none=True)
    (loss * world).backward()  # DDP averages gradients over ranks; eq. (1) wants their sum
    optimizer.step()
    return float(loss.detach())


class Trainer:
    def __init__(self, config: TrainConfig, settings: Settings, ctx: _Dist) -> None:
        if config.mask_same_text is None:  # resolved here, so the resume check compares what ran
            config = dataclasses.replace(config, mask_same_text=settings.train.mask_same_text)
        self.config, self.settings, self.ctx = config, settings, ctx
        self.device = ctx.device
        self.amp = config.amp if config.amp is not None else self.device.startswith("cuda")
        self.out = Path(config.out_dir)
        if config.feature_cache is not None and config.augment:
            raise ValueError("the feature cache holds un-augmented features: set augment=False to use it")

        preset = preset_for(settings.model_copy(update={"preset": config.preset}))  # with --sam/--clip/--dinov2
        self.model: UseModel = build_use_model(
            preset, settings, self.device, grid=config.grid, lln_dim=config.lln_dim, seed=config.seed
        )
        # Every checkpoint records the scale it was trained at: voting reuses it (UseConfig.logit_scale).
        self.model.config = dataclasses.replace(self.model.config, logit_scale=config.logit_scale)
        grid = self.model.config.grid
        self.crop = config.crop or grid * self.model.backbones.clip_patch

        images = load_pairs(config.train)
        val = load_pairs(config.val)
        if not val and config.val_fraction > 0:
            images, val = split_holdout(images, config.val_fraction, config.seed)
        self.val_images = val
        self.steps_per_epoch = EpochBatches.steps_per_epoch(len(images), config.batch_size)
        if not images:
            raise ValueError("no training images with segments in the data given")
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(images)} training images with segments: fewer than one batch of {config.batch_size}; "
                f"pass --batch-size {len(images)} or less (every image of a batch enters the loss) or add images"
            )
        self.total_steps = config.epochs * self.steps_per_epoch
        self.dataset = PairDataset(
            images, crop=self.crop, grid=grid, seed=config.seed, augment=config.augment,
            scale_range=config.scale_range, max_segments=config.max_segments_per_image,
            min_visible=config.min_visible, feature_dir=config.feature_cache,
        )
        params = list(self.model.trainable.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.trainable: torch.nn.Module = self.model.trainable
        if ctx.world > 1:
            self.trainable = DistributedDataParallel(
                self.model.trainable, device_ids=[torch.device(self.device).index] if self.device.startswith("cuda") else None
            )
        self.texts = TextBank(TextEncoder(self.model.clip, self.device), self.device, self.amp)
        self.embedder = UseEmbedder(self.model, self.device, tag="training") if val and ctx.rank == 0 else None
        self.step = 0

    # -- state -------------------------------------------------------------------------------------
    def save(self, epoch_done: int | None) -> Path:
        """USE checkpoint(s) + optimizer state; rank 0 writes, everyone waits."""
        last = self.out / "last.safetensors"
        if self.ctx.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if epoch_done is not None:
                self.model.save(self.out / f"epoch-{epoch_done:03d}.safetensors", trained_steps=self.step)
            self.model.save(last, trained_steps=self.step)
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "config": json.dumps(resume_key(self.config))}
            tmp = self.out / f".train_state.pt.tmp{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, self.out / "train_state.pt")
        self.ctx.barrier()
        return last

    def restore(self) -> None:
        path = self.out / "train_state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        # Runs saved before the setting existed masked same-text negatives.
        saved, now = {"mask_same_text": True, **json.loads(state["config"])}, resume_key(self.config)
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise ValueError(f"cannot resume {self.out}: settings changed since the run started: {', '.join(diff)}")
        use_config, weights = read_use_checkpoint(self.out / "last.safetensors")
        if dataclasses.replace(use_config, trained_steps=0) != dataclasses.replace(self.model.config, trained_steps=0):
            raise ValueError(f"cannot resume {self.out}: last.safetensors was written for another model")
        self.model.trainable.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def log(self, record: dict[str, Any]) -> None:
        if self.ctx.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # -- feature cache -----------------------------------------------------------------------------
    def build_feature_cache(self) -> None:
        """Run the frozen towers once over the un-augmented training images and store their outputs
        (fp16); training then reads them instead of images. Rebuilt when anything they depend on changes."""
        folder = Path(self.config.feature_cache)  # type: ignore[arg-type]
        c = self.model.config
        manifest = {
            "clip": c.clip_fingerprint, "dinov2": c.dinov2_fingerprint, "grid": c.grid, "blocks": c.dinov2_blocks,
            "crop": self.crop, "images": hashlib.sha256("\n".join(r.path for r in self.dataset.images).encode()).hexdigest(),
        }
        mpath = folder / "manifest.json"
        n = len(self.dataset)
        fresh = mpath.is_file() and json.loads(mpath.read_text()) == manifest and all(
            feature_path(folder, i).is_file() for i in range(n)
        )
        self.ctx.barrier()  # every rank has looked before anything changes, so all agree on `fresh`
        if not fresh:
            from safetensors.torch import save_file

            folder.mkdir(parents=True, exist_ok=True)
            if self.ctx.rank == 0:
                mpath.unlink(missing_ok=True)  # a build killed halfway must not look complete
            source = PairDataset(self.dataset.images, crop=self.crop, grid=c.grid, seed=self.config.seed, augment=False)
            mine = list(range(self.ctx.rank, n, self.ctx.world))
            for start in range(0, len(mine), max(1, self.config.batch_size)):
                idx = mine[start : start + self.config.batch_size]
                images = torch.stack([source[(0, i)].image for i in idx]).to(self.device).float() / 255.0
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                    feats = self.model.backbones(images)
                for j, i in enumerate(idx):
                    save_file({k: v.half().cpu().contiguous() for k, v in feats.per_image(j).items()}, str(feature_path(folder, i)))
        self.ctx.barrier()
        if not fresh and self.ctx.rank == 0:
            mpath.write_text(json.dumps(manifest))

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> float:
        lr = poly_lr(self.config.lr, self.step, self.total_steps, self.config.poly_power)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        txt = self.texts(batch.texts)
        ids = text_ids(batch.texts).to(self.device)
        loss = contrastive_step(self.model, self.trainable, self.optimizer, batch, txt, ids,
                                logit_scale=self.config.logit_scale, amp=self.amp, world=self.ctx.world,
                                mask_same_text=bool(self.config.mask_same_text))
        self.step += 1
        return loss

    def evaluate(self, epoch: int) -> dict[str, Any] | None:
        metrics = None
        if self.embedder is not None:
            metrics = {"kind": "eval", "epoch": epoch, "step": self.step,
                       **evaluate_retrieval(self.embedder, self.val_images, self.config.eval_ks)}
            self.model.trainable.train()
            self.log(metrics)
        self.ctx.barrier()
        return metrics

    # -- the run -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.config
        if cfg.resume:
            self.restore()
        if cfg.feature_cache is not None:
            self.build_feature_cache()
        result = TrainResult(step=self.step)
        stop_at = min(self.total_steps, cfg.max_steps) if cfg.max_steps is not None else self.total_steps
        if cfg.eval_at_start and self.step == 0 and (m := self.evaluate(0)) is not None:
            result.evals.append(m)
        self.model.trainable.train()

        progress = Progress(
            TextColumn("[bold]train[/] epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.1f} img/s  {task.fields[sps]:.0f} seg/s"),
            TimeRemainingColumn(), disable=not cfg.progress or self.ctx.rank != 0,
        )
        with progress:
            task = progress.add_task("train", total=stop_at, completed=self.step, epoch=0, loss=float("nan"),
                                     lr=cfg.lr, ips=0.0, sps=0.0)
            while self.step < stop_at:
                epoch = self.step // self.steps_per_epoch
                sampler = EpochBatches(
                    len(self.dataset), cfg.batch_size, epoch=epoch, seed=cfg.seed, rank=self.ctx.rank,
                    world=self.ctx.world, start_step=self.step - epoch * self.steps_per_epoch,
                )
                loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                                    pin_memory=self.device.startswith("cuda"))
                tick, tick_step, segs = time.perf_counter(), self.step, 0
                for batch in loader:
                    loss = self.train_step(batch)
                    lr = self.optimizer.param_groups[0]["lr"]
                    segs += batch.segments
                    result.losses.append((self.step, loss))
                    if self.step % cfg.log_every == 0 or self.step == stop_at:
                        dt = max(time.perf_counter() - tick, 1e-9)
                        ips, sps = (self.step - tick_step) * cfg.batch_size / dt, segs * self.ctx.world / dt
                        self.log({"kind": "step", "step": self.step, "epoch": epoch, "loss": loss, "lr": lr,
                                  "images_per_s": ips, "segments_per_s": sps})
                        progress.update(task, completed=self.step, epoch=epoch + 1, loss=loss, lr=lr, ips=ips, sps=sps)
                        tick, tick_step, segs = time.perf_counter(), self.step, 0
                    if self.step == stop_at:
                        break
                epoch_done = self.step % self.steps_per_epoch == 0
                if epoch_done:
                    result.checkpoint = self.save(self.step // self.steps_per_epoch)
                    if (m := self.evaluate(self.step // self.steps_per_epoch)) is not None:
                        result.evals.append(m)
                        progress.console.print(
                            f"epoch {m['epoch']}: " + "  ".join(f"R@{k} {m[f'recall@{k}']:.3f}" for k in cfg.eval_ks)
                            + f"  (chance R@{cfg.eval_ks[0]} {m[f'chance@{cfg.eval_ks[0]}']:.3f}, "
                            f"{m['queries']} queries, {m['segments']} segments)"
                        )
                elif self.step == stop_at:
                    result.checkpoint = self.save(None)
        result.step = self.step
        if result.checkpoint is None and (self.out / "last.safetensors").is_file():  # resumed a finished run
            result.checkpoint = self.out / "last.safetensors"
        return result


def run(config: TrainConfig, settings: Settings | None = None) -> TrainResult:
    """Train (or resume) a USE head as ``config`` says; returns the losses, evaluations and the path
    of ``last.safetensors``. Under ``torchrun`` every rank calls this."""
    settings = settings or Settings()
    ctx = _Dist.setup(config, settings)
    try:
        result = Trainer(config, settings, ctx).fit()
        ctx.barrier()  # rank 0 hosts the rendezvous store: no rank tears down while another still needs it
        return result
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()
