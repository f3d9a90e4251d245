"""The training loop: recipe in, checkpoints + metrics + curves out. Read it top to bottom.

One process, or one per rank under ``torchrun`` (DDP: gloo on CPU, nccl on CUDA). Only rank 0
writes files; validation counts are summed across ranks before any metric is computed.

Determinism: everything random derives from ``recipe.seed`` and the epoch number: the model's
initialisation, the shuffling (a DistributedSampler, even with one process), the augmentation
stream (reseeded every epoch) and dropout (torch's RNG, saved in every checkpoint). So on CPU
the same recipe gives the same loss curve twice, and 2 epochs + resume 2 equals 4 straight.

Example:
    >>> from training.config import load_recipe
    >>> summary = train(load_recipe("configs/default.yaml"), Path("runs/default"))
    ... # doctest: +SKIP
    >>> summary["best_miou"]  # doctest: +SKIP
    0.83
"""

from __future__ import annotations

import csv
import functools
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

from training import tracking
from training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from training.class_weights import class_presence, resolve_class_weights
from training.config import ConfigError, Recipe, save_recipe
from training.losses import TrainingLoss, build_loss
from training.metrics import ConfusionMatrix
from training.model import build_model, load_teacher
from training.repeat_factor import repeat_factors, repeated_indices
from training.resolve import build_metadata, resolve_preprocess_spec
from training.schedule import build_optimizer, build_scheduler

# Keys a resumed run may change; anything else would make "resume" a different experiment.
RESUMABLE = {
    "train.epochs",
    "train.progress",
    "train.threads",
    "train.early_stopping_patience",
    "train.early_stopping_min_delta",
    "data.num_workers",
    "output_dir",
    # where the run is tracked, not what it trains (a resumed run keeps its tracking.json run)
    "track",
    "track.enabled",
    "track.uri",
    "track.experiment",
    "track.log_model_max_mb",
}


# --- where we run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """This process's place in the (possibly distributed) job."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(recipe: Recipe) -> Runtime:
    """Pick the device; join the process group when launched by torchrun with WORLD_SIZE > 1."""
    want = recipe.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' asked for but no CUDA device is visible; use auto")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(rank=rank, world_size=world_size, device=device)


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``train.amp`` → (autocast dtype or None, use a GradScaler).

    auto: fp16 + GradScaler on CUDA; bf16 on a CPU with native bf16 (AVX512-BF16/AMX, where it
    trains ~3x faster than fp32), else fp32: on an AVX2-only CPU oneDNN emulates bf16 and a
    training step is ~16x *slower* than fp32 (measured: resnet18 Unet, 128 px).
    """
    on_cuda = device.type == "cuda"
    if mode == "off":
        return None, False
    if mode == "auto" and not on_cuda:
        return (torch.bfloat16 if cpu_has_native_bf16() else None), False
    if mode == "bf16":
        return torch.bfloat16, False
    if not on_cuda:
        raise ConfigError("train.amp: fp16 needs CUDA; use 'auto' or 'bf16' on CPU")
    return torch.float16, True


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 convolutions in hardware on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


# --- data ----------------------------------------------------------------------------------------


def make_loaders(recipe: Recipe, spec: Any, rt: Runtime) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled per epoch by a DistributedSampler) and this rank's val shard."""
    from training.datasets import build_dataset, segmentation_collate

    data = recipe.data
    train_ds = build_dataset(data, data.train_split, spec, train=True)
    val_ds = build_dataset(data, data.val_split, spec, train=False)
    per_rank = len(train_ds) // rt.world_size
    if per_rank < data.batch_size:
        raise ConfigError(
            f"data.batch_size: {data.batch_size} is larger than the {per_rank} training images "
            f"each of the {rt.world_size} process(es) gets; lower it or add data"
        )
    collate = functools.partial(
        segmentation_collate, size_divisor=spec.size_divisor, ignore_index=data.ignore_index
    )
    if data.rare_repeat is not None:
        train_ds = rare_repeated(train_ds, data.rare_repeat, recipe.seed)
    sampler = DistributedSampler(
        train_ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=recipe.seed
    )
    common = {"collate_fn": collate, "num_workers": data.num_workers, "pin_memory": False}
    train_loader = DataLoader(
        train_ds,
        batch_size=data.batch_size,
        sampler=sampler,
        drop_last=True,  # a last batch of 1 breaks BatchNorm
        generator=torch.Generator(),
        **common,
    )
    # Every val image exactly once over all ranks (DistributedSampler would pad with repeats
    # and bias the summed confusion matrix).
    val_shard = Subset(val_ds, range(rt.rank, len(val_ds), rt.world_size))
    val_loader = DataLoader(val_shard, batch_size=data.batch_size, shuffle=False, **common)
    return train_loader, val_loader


def rare_repeated(train_ds: Any, threshold: float, seed: int) -> Subset:
    """``train_ds`` with its rare-class images repeated (``data.rare_repeat``); the list is a
    function of the masks and ``seed`` only, so every rank and a resumed run draw the same."""
    info = train_ds.info
    presence = class_presence(train_ds, info.num_classes, info.ignore_index)
    indices = repeated_indices(repeat_factors(presence, threshold), seed)
    # One write with its newline, not print() (text and end are two writes): torchrun's ranks
    # share an unbuffered stdout (PYTHONUNBUFFERED), where two ranks' lines ran together.
    sys.stdout.write(f"data.rare_repeat={threshold}: {len(indices)} training samples per "
                     f"epoch from {len(train_ds)} images\n")  # fmt: skip
    sys.stdout.flush()
    return Subset(train_ds, indices)


def start_epoch(loader: DataLoader, seed: int, epoch: int, rank: int = 0) -> None:
    """Make this epoch's shuffling and augmentations a function of (seed, epoch, rank) only.

    The rank keeps ranks from drawing the same augmentation stream for different images.
    """
    loader.sampler.set_epoch(epoch)
    stream = _epoch_seed(seed, epoch) + 7919 * rank
    loader.generator.manual_seed(stream)  # DataLoader worker seeds derive from it
    from training.datasets import unwrap_subsets

    dataset, _ = unwrap_subsets(loader.dataset)  # data.rare_repeat wraps the dataset
    reseed = getattr(getattr(dataset, "transform", None), "reseed", None)
    if reseed is not None:
        reseed(stream)  # the main-process stream (num_workers=0)


def unused_parameters(model: torch.nn.Module, device: torch.device) -> list[str]:
    """Names of trainable parameters that get no gradient from a forward pass.

    Probed in eval mode on a zero image: BatchNorm statistics and the RNG stay untouched.
    """
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, 64, 64, device=device)).float().sum().backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return unused


# --- one epoch -----------------------------------------------------------------------------------


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
    grad_clip: float | None,
    rt: Runtime,
    progress: Any = None,
    teacher: torch.nn.Module | None = None,
) -> dict[str, float]:
    """One pass over the training data; returns mean loss (all ranks), images, seconds.

    ``loss_fn(outputs, y, teacher_logits)`` (:class:`~training.losses.TrainingLoss`) takes the
    model's training-mode outputs (BiSeNetV2 adds its auxiliary logits) and, with a frozen
    distillation ``teacher``, the teacher's logits for the same batch.
    """
    model.train()
    total_loss = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (sum, batches)
    images, started = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with torch.autocast(rt.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(x)
            with torch.no_grad():  # the teacher only gives targets; no graph kept for it
                teacher_logits = None if teacher is None else teacher(x)
        loss = loss_fn(outputs, y, teacher_logits)  # in float32, outside autocast
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()  # per optimiser step: warmup and decay are defined in steps
        total_loss += torch.tensor([loss.item(), 1.0], dtype=torch.float64, device=rt.device)
        images += x.shape[0] * rt.world_size
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    if rt.distributed:
        dist.all_reduce(total_loss)
    seconds = time.perf_counter() - started
    return {
        "train_loss": float(total_loss[0] / total_loss[1].clamp(min=1)),
        "images": images,
        "seconds": seconds,
    }


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: torch.nn.Module,
    num_classes: int,
    ignore_index: int,
    amp_dtype: torch.dtype | None,
    rt: Runtime,
) -> dict[str, Any]:
    """Val loss and confusion-matrix metrics, summed over all ranks' shards.

    Logits are upsampled to the mask's size when they differ (``pad`` policy keeps masks at
    native resolution); padded pixels carry ignore_index and count for nothing.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device=rt.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (sum * n, n)
    for x, y in loader:
        x, y = x.to(rt.device), y.to(rt.device)
        with torch.autocast(rt.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss_sum += torch.tensor(
            [loss_fn(logits, y).item() * x.shape[0], x.shape[0]], dtype=torch.float64
        ).to(rt.device)
        cm.update(logits.argmax(dim=1), y)
    cm.all_reduce()
    if rt.distributed:
        dist.all_reduce(loss_sum)
    metrics = cm.compute()
    metrics["val_loss"] = float(loss_sum[0] / loss_sum[1].clamp(min=1))
    metrics["confusion_matrix"] = cm.matrix.cpu().tolist()
    return metrics


# --- run files -----------------------------------------------------------------------------------

CSV_FIELDS = [
    "epoch", "lr", "train_loss", "val_loss", "val_miou", "pixel_acc", "mean_acc", "mean_dice",
    "images_per_s", "epoch_time_s", "best_miou",
]  # fmt: skip


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv and metrics.jsonl from the full history (resume-safe)."""
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(_json_safe(row)) + "\n")


def read_history(run_dir: Path, epochs: int) -> list[dict[str, Any]]:
    """The first ``epochs`` rows of metrics.jsonl (a crash may have left a later row)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= epochs]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """curves.png: train/val loss and val mIoU per epoch (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_miou = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_miou.plot(epochs, [r["val_miou"] for r in history], "o-", color="tab:green")
    ax_miou.set(xlabel="epoch", ylabel="mIoU", title="val mIoU", ylim=(0, 1))
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


# --- the run -------------------------------------------------------------------------------------


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        dotted = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _changed_keys(a[k], b[k], dotted + ".")
        elif a.get(k) != b.get(k):
            keys.append(dotted)
    return keys


def load_resumable(last_path: Path, recipe: Recipe) -> dict:
    """The checkpoint to resume from, after checking it continues *this* recipe."""
    ckpt = load_checkpoint(last_path)
    changed = [k for k in _changed_keys(ckpt["recipe"], recipe.to_dict()) if k not in RESUMABLE]
    if changed:
        raise ConfigError(
            f"--resume: the recipe differs from the run's in {changed}; only "
            f"{sorted(RESUMABLE)} may change. Start a new --run-dir instead"
        )
    if ckpt["epoch"] >= recipe.train.epochs:
        raise ConfigError(
            f"--resume: {last_path} already completed {ckpt['epoch']} of "
            f"train.epochs={recipe.train.epochs}; raise train.epochs to train longer"
        )
    return ckpt


@dataclass
class Progress:
    """Loop counters; saved in every checkpoint so a resumed run carries on from them."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = 0
    epochs_without_improvement: int = 0

    def record(self, miou: float, min_delta: float) -> None:
        """Count epoch ``self.epoch`` (already advanced) for best-model and early stopping."""
        miou = miou if miou == miou else float("-inf")  # NaN (no valid pixel) never wins
        improved = miou > self.best_metric + min_delta
        if miou > self.best_metric:
            self.best_metric, self.best_epoch = miou, self.epoch
        self.epochs_without_improvement = 0 if improved else self.epochs_without_improvement + 1


@dataclass
class Trainer:
    """Everything stateful that a checkpoint must capture, built from one recipe."""

    model: torch.nn.Module  # the bare model (never the DDP wrapper): its state_dict is portable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    progress: Progress

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **vars(self.progress),
            "rng": capture_rng_state(),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        curve = self.scheduler.lr_lambdas[0]  # from this recipe (train.epochs may have grown)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scheduler.lr_lambdas[0] = curve
        self.scaler.load_state_dict(ckpt["scaler"])
        for key in vars(self.progress):
            setattr(self.progress, key, ckpt.get(key, getattr(self.progress, key)))
        restore_rng_state(ckpt["rng"])


def epoch_row(epoch: int, lr: float, stats: dict, metrics: dict, best: float, names) -> dict:
    """One line of metrics.csv / metrics.jsonl."""
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": stats["train_loss"],
        "val_loss": metrics["val_loss"],
        "val_miou": metrics["miou"],
        "pixel_acc": metrics["pixel_accuracy"],
        "mean_acc": metrics["mean_accuracy"],
        "mean_dice": metrics["mean_dice"],
        "images_per_s": stats["images"] / max(stats["seconds"], 1e-9),
        "epoch_time_s": stats["seconds"],
        "best_miou": best,
        "per_class_iou": dict(zip(names, metrics["per_class_iou"], strict=True)),
    }


def train(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    """Train ``recipe`` into ``run_dir``; returns the best and final validation metrics.

    ``resume=True`` continues from ``run_dir/checkpoints/last.pt`` exactly where it stopped
    (model, optimiser, scheduler, scaler, epoch, RNG).
    """
    from tqdm.auto import tqdm

    from training.datasets import dataset_info
    from training.splits import with_split_dir, write_split_lists

    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    if not resume and last_path.exists():
        raise ConfigError(
            f"{run_dir}: already holds a trained run ({last_path}); pass --resume to continue "
            "it or choose another --run-dir"
        )
    # data.split: its lists live in RUN_DIR/splits (set before the resume check, which compares
    # recipes); a resumed run reads the lists it drew, never a new draw.
    recipe = with_split_dir(recipe, run_dir)
    resume_from = load_resumable(last_path, recipe) if resume else None  # fail before building

    rt = setup_runtime(recipe)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    if recipe.train.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    seed_everything(recipe.seed)  # same on every rank: identical initial weights

    info = dataset_info(recipe.data)
    spec = resolve_preprocess_spec(recipe)
    num_classes, ignore_index = len(info.class_names), recipe.data.ignore_index
    # train.distill: the teacher, rebuilt on every rank (frozen, eval); a bad run dir fails here
    distill = recipe.train.distill
    teacher = (
        None if distill is None
        else load_teacher(distill, info.class_names, (spec.mean, spec.std), rt.device)
    )  # fmt: skip
    if rt.is_main:
        write_split_lists(recipe.data)  # other ranks draw the same split in memory meanwhile
    train_loader, val_loader = make_loaders(recipe, spec, rt)

    model = build_model(recipe.model, num_classes).to(rt.device)
    optimizer = build_optimizer(model, recipe.optim)
    amp_dtype, use_scaler = resolve_amp(recipe.train.amp, rt.device)
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(
            optimizer, recipe.schedule, len(train_loader), recipe.train.epochs
        ),
        scaler=torch.amp.GradScaler(rt.device.type, enabled=use_scaler),
        progress=Progress(),
    )
    # loss.class_weights: inverse / median_frequency are counted on the training masks, once.
    class_weights = resolve_class_weights(
        recipe.loss, train_loader.dataset, info.class_names, ignore_index,
        run_dir if rt.is_main else None, rt.rank, rt.world_size, rt.device,
    )  # fmt: skip
    loss_fn = build_loss(recipe.loss, num_classes, ignore_index, class_weights).to(rt.device)
    # Training adds BiSeNetV2's booster heads (loss.aux_weight; null: the paper's 1.0) and the
    # distillation term; validation's loss stays the plain label loss, comparable across runs.
    objective = TrainingLoss(
        loss_fn,
        aux_weight=1.0 if recipe.loss.aux_weight is None else recipe.loss.aux_weight,
        distill_weight=0.0 if distill is None else distill.weight,
        temperature=1.0 if distill is None else distill.temperature,
    )
    history: list[dict[str, Any]] = []
    if resume_from is not None:
        trainer.load_state_dict(resume_from)
        history = read_history(run_dir, trainer.progress.epoch)
    state = trainer.progress

    forward_model = model
    if rt.distributed:
        forward_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            # e.g. encoder_depth < 5 leaves smp's deepest encoder stages unused; DDP would
            # otherwise wait forever for their gradients. The search costs time: only if needed
            # (BiSeNetV2's booster heads count as unused: the probe runs in eval mode).
            find_unused_parameters=bool(unused_parameters(model, rt.device)),
        )
    tracker = tracking.NO_TRACKING  # rank 0 tracks; a tracking failure never stops the run
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        tracker = tracking.start_training(recipe, run_dir, resume, history)

    patience = recipe.train.early_stopping_patience
    stopped_early = False
    for epoch in range(state.epoch, recipe.train.epochs):
        start_epoch(train_loader, recipe.seed, epoch, rt.rank)
        bar = tqdm(
            total=len(train_loader),
            desc=f"epoch {epoch + 1}/{recipe.train.epochs}",
            disable=not (rt.is_main and recipe.train.progress),
            leave=False,
        )
        lr = trainer.scheduler.get_last_lr()[0]
        stats = train_one_epoch(
            forward_model, train_loader, objective, optimizer, trainer.scheduler, trainer.scaler,
            amp_dtype, recipe.train.grad_clip, rt, bar, teacher,
        )  # fmt: skip
        bar.close()
        metrics = validate(
            forward_model, val_loader, loss_fn, num_classes, ignore_index, amp_dtype, rt
        )
        state.epoch, state.global_step = epoch + 1, state.global_step + len(train_loader)
        state.record(metrics["miou"], recipe.train.early_stopping_min_delta)
        row = epoch_row(epoch + 1, lr, stats, metrics, state.best_metric, info.class_names)
        history.append(row)

        if rt.is_main:  # every rank holds the same numbers; one writes them
            ckpt = trainer.state_dict() | {"recipe": recipe.to_dict(), "metrics": metrics}
            if state.best_epoch == epoch + 1:
                meta = build_metadata(recipe, info, spec, metrics, str(best_path))
                save_checkpoint(best_path, ckpt | {"metadata": meta.to_dict()})
            meta = build_metadata(recipe, info, spec, metrics, str(last_path))
            # a crash resumes from here
            save_checkpoint(last_path, ckpt | {"metadata": meta.to_dict()})
            write_history(run_dir, history)
            plot_curves(history, run_dir / "curves.png")
            tracker.log_epoch(row)
            tracker.log_artifact(run_dir / "curves.png")
            tqdm.write(
                f"epoch {epoch + 1}/{recipe.train.epochs}  train_loss {row['train_loss']:.4f}  "
                f"val_loss {row['val_loss']:.4f}  val_miou {row['val_miou']:.4f}  "
                f"{row['images_per_s']:.1f} img/s  {row['epoch_time_s']:.1f}s"
            )
        if patience is not None and state.epochs_without_improvement >= patience:
            stopped_early = True
            if rt.is_main:
                tqdm.write(f"early stopping: no val mIoU gain for {patience} epoch(s)")
            break

    if rt.distributed:
        dist.barrier()  # rank 0's files are complete before anyone returns
        dist.destroy_process_group()
    summary = {
        "best_miou": state.best_metric,
        "best_epoch": state.best_epoch,
        "epochs_completed": state.epoch,
        "stopped_early": stopped_early,
        "final": history[-1] if history else {},
        "best_checkpoint": str(best_path),
        "last_checkpoint": str(last_path),
    }
    tracking.finish_training(tracker, run_dir, summary)
    return summary
