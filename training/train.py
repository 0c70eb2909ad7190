"""The training loop: plain functions over in-memory tensors, one epoch at a time."""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training import distributed
from training.data import DataError, Mnist, Share, share_of
from training.model import Net


@dataclass
class TrainConfig:
    """Every knob of a training run; the CLI flags map onto these one to one."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.01
    seed: int = 1
    device: str = "auto"
    val_size: int = 5_000  # held out of the 60,000 training images for the per-epoch line
    train_limit: int | None = None  # train on the first N images only (smoke tests)
    augment: bool = True


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class TrainState:
    """What a checkpoint holds, as the original notebook saved it, plus the scheduler."""

    model: Net
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0  # epochs completed
    history: list[EpochResult] = field(default_factory=list)

    def checkpoint(self, config: TrainConfig) -> dict:
        return {
            "epoch": self.epoch,
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "loss": self.history[-1].train_loss if self.history else None,
            "history": [asdict(h) for h in self.history],
            "config": asdict(config),
        }

    def restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model_state_dict"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        if "scheduler_state_dict" in checkpoint:
            self.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        self.epoch = int(checkpoint["epoch"])
        self.history = [EpochResult(**h) for h in checkpoint.get("history", [])]


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: CUDA is not available here; use --device cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def as_share(data: Mnist | Share) -> Share:
    """The data one process holds whole, as the share of a single rank."""
    return data if isinstance(data, Share) else share_of(data, np.arange(len(data.train_images)), with_test=True)


def split(data: Mnist | Share, config: TrainConfig):
    """This rank's training and validation tensors: of the first `train_limit + val_size` images of the whole set
    (all of them without a limit), the last `val_size` are held out. Decided by id, so the same images are held
    out whatever the number of ranks."""
    share = as_share(data)
    ids = share.train_ids
    used = min(share.train_total, config.train_limit + config.val_size) if config.train_limit else share.train_total
    cut = used - config.val_size
    if cut <= 0:
        raise ValueError(f"--val-size {config.val_size} leaves no training images out of {used}")
    train, val = ids < cut, (ids >= cut) & (ids < used)
    return (
        to_tensors(share.train_images[train], share.train_labels[train]),
        to_tensors(share.train_images[val], share.train_labels[val]),
    )


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random rotations, scalings and shifts, the way handwriting varies (0..1 floats in and out)."""
    n = batch.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(20)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.2  # up to +-1.4 px of 28
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(batch.device), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, align_corners=False, padding_mode="zeros")


def step_bounds(count: int, total: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) in this rank's `count` shuffled images for each optimiser step. Every rank takes the same
    ceil(total / batch_size) steps (gradients are averaged at each), a rank's part of a step in proportion to its
    share, so that a step covers about batch_size images over all ranks, as a one-process step does. One process
    holding all images gets plain batches of batch_size."""
    steps = math.ceil(total / batch_size)
    edges = [min(count, -(-k * batch_size * count // total)) for k in range(steps + 1)]
    return list(itertools.pairwise(edges))


def train_epoch(
    model: nn.Module,
    device: torch.device,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    generator: torch.Generator,
    progress: str,
    total: int | None = None,
) -> float:
    """One pass over the shuffled training images; returns the mean training loss (over every rank's images).
    `total`: the training images of all ranks together (None: this process holds them all)."""
    model.train()
    world = distributed.size()
    total = total or len(images)
    order = torch.randperm(len(images), generator=generator)
    total_loss, seen = 0.0, 0
    steps = step_bounds(len(images), total, config.batch_size)
    quiet = None if distributed.is_main() else True  # rank 0 shows the one progress bar
    bar = tqdm(steps, desc=progress, unit="batch", leave=False, file=sys.stderr, disable=quiet)
    for step, (start, end) in enumerate(bar):
        index = order[start:end]
        batch = images[index].to(device).float().div_(255)
        if config.augment:
            batch = augment(batch, generator)
        target = labels[index].to(device)
        optimizer.zero_grad(set_to_none=True)
        if world == 1:
            loss = F.cross_entropy(model(batch), target)
            total_loss += loss.item() * len(index)
        else:
            summed = F.cross_entropy(model(batch), target, reduction="sum")
            # DDP averages the ranks' gradients; scaled so that average is the gradient of the mean loss over the
            # step's images on all ranks, however unevenly they are spread (a rank may even have none).
            loss = summed * (world / min(config.batch_size, total - step * config.batch_size))
            total_loss += summed.item()
        loss.backward()
        optimizer.step()
        scheduler.step()
        seen += len(index)
        bar.set_postfix(loss=f"{total_loss / max(seen, 1):.4f}", refresh=False)
    if world == 1:
        return total_loss / seen
    total_loss, seen = distributed.all_reduce_sums([total_loss, seen])
    return total_loss / seen


@torch.inference_mode()
def evaluate(
    model: nn.Module, device: torch.device, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
):
    """Mean loss, accuracy and every prediction, on raw uint8 images as serving sees them."""
    model.eval()
    losses, predictions = [], []
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size].to(device))
        target = labels[start : start + batch_size].to(device)
        losses.append(F.cross_entropy(logits, target, reduction="sum").item())
        predictions.append(logits.argmax(1).cpu())
    predicted = torch.cat(predictions)
    return sum(losses) / len(images), (predicted == labels).float().mean().item(), predicted


@torch.inference_mode()
def evaluate_together(
    model: nn.Module, device: torch.device, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean loss and accuracy over every rank's images: each rank scores its own, and the sums are added up, so
    the figures are those of the whole set."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size].to(device))
        target = labels[start : start + batch_size].to(device)
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    loss, correct, count = distributed.all_reduce_sums([loss, correct, len(images)])
    return loss / count, correct / count


def new_state(config: TrainConfig, device: torch.device, steps_per_epoch: int) -> TrainState:
    model = Net().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
    )
    return TrainState(model, optimizer, scheduler)


def restore(state: TrainState, checkpoint: dict, config: TrainConfig) -> None:
    """Continue from a checkpoint, saved under any number of ranks, if it fits this run."""
    planned = checkpoint.get("scheduler_state_dict", {}).get("total_steps")
    steps = state.scheduler.total_steps
    if planned is not None and planned != steps:
        raise ValueError(
            f"--resume: the checkpoint's learning-rate schedule has {planned // config.epochs:,} steps per epoch, "
            f"this run's {steps // config.epochs:,}; resume with the --batch-size, --train-limit and --val-size "
            "it was saved with (the number of ranks may change)"
        )
    try:
        state.restore(checkpoint)
    except (RuntimeError, KeyError) as error:
        reason = " ".join(str(error).split())[:300]  # its lines name the layers
        raise ValueError(f"--resume: the checkpoint does not fit this model ({reason})") from None


def check_every_rank_has_images(counts: list[int]) -> None:
    empty = [number for number, count in enumerate(counts) if count == 0]
    if empty:
        raise DataError(
            f"rank {empty[0]} of {len(counts)} gets no training images: there are {sum(counts):,} to share out; "
            "start no more ranks than that, or train on more images (--train-limit, --val-size)"
        )


def train(
    mnist: Mnist | Share,
    config: TrainConfig,
    resume: dict | None = None,
    on_epoch: Callable[[TrainState], None] = lambda state: None,
) -> TrainState:
    """Train to `config.epochs`, from scratch or from a checkpoint; calls `on_epoch` after each epoch.
    Under torchrun each rank calls it with its own share of the images, and they train one model together."""
    seed_everything(config.seed)
    device = distributed.rank_device(pick_device(config.device))
    (train_x, train_y), (val_x, val_y) = split(mnist, config)
    counts = distributed.all_gather(len(train_x))
    check_every_rank_has_images(counts)
    total = sum(counts)
    # Steps per epoch depend on the whole set, not on the number of ranks: the schedule in a checkpoint
    # fits a run with any number of ranks.
    state = new_state(config, device, steps_per_epoch=math.ceil(total / config.batch_size))
    if resume is not None:
        restore(state, resume, config)
    model = distributed.wrap(state.model, device)
    world, rank = distributed.size(), distributed.rank()
    # One generator drives shuffling and augmentation; re-seeded per epoch so a resumed
    # run sees the same batches as an uninterrupted one. Rank 0 draws what one process would.
    generator = torch.Generator()
    for epoch in range(state.epoch + 1, config.epochs + 1):
        generator.manual_seed(config.seed * 1000 + epoch + (rank << 32))
        started = time.perf_counter()
        train_loss = train_epoch(
            model,
            device,
            train_x,
            train_y,
            state.optimizer,
            state.scheduler,
            config,
            generator,
            progress=f"epoch {epoch}/{config.epochs}",
            total=total,
        )
        if world == 1:
            val_loss, val_accuracy, _ = evaluate(state.model, device, val_x, val_y)
        else:
            distributed.share_buffers(state.model)
            val_loss, val_accuracy = evaluate_together(state.model, device, val_x, val_y)
        result = EpochResult(epoch, train_loss, val_loss, val_accuracy, time.perf_counter() - started)
        state.history.append(result)
        state.epoch = epoch
        line = (
            f"epoch {epoch}/{config.epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
            f"val accuracy {val_accuracy:.2%}  {result.seconds:.0f} s"
        )
        if world == 1:
            print(line, file=sys.stderr)
        else:
            distributed.log(f"rank {rank} of {world}: {line}  ({len(train_x):,} of the {total:,} training images here)")
        on_epoch(state)
    return state
