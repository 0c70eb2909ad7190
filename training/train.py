"""The training loop: plain functions over in-memory tensors, one epoch at a time."""

from __future__ import annotations

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

from training.data import Mnist
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


def split(mnist: Mnist, config: TrainConfig):
    """Training and validation tensors: the last `val_size` training images are held out."""
    images, labels = to_tensors(mnist.train_images, mnist.train_labels)
    if config.train_limit:
        images, labels = images[: config.train_limit + config.val_size], labels[: config.train_limit + config.val_size]
    cut = len(images) - config.val_size
    if cut <= 0:
        raise ValueError(f"--val-size {config.val_size} leaves no training images out of {len(images)}")
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


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
) -> float:
    """One pass over the shuffled training images; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(images), generator=generator)
    total_loss, seen = 0.0, 0
    batches = range(0, len(images), config.batch_size)
    bar = tqdm(batches, desc=progress, unit="batch", leave=False, file=sys.stderr, disable=None)
    for start in bar:
        index = order[start : start + config.batch_size]
        batch = images[index].to(device).float().div_(255)
        if config.augment:
            batch = augment(batch, generator)
        target = labels[index].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(batch), target)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(index)
        seen += len(index)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
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


def new_state(config: TrainConfig, device: torch.device, steps_per_epoch: int) -> TrainState:
    model = Net().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
    )
    return TrainState(model, optimizer, scheduler)


def train(
    mnist: Mnist,
    config: TrainConfig,
    resume: dict | None = None,
    on_epoch: Callable[[TrainState], None] = lambda state: None,
) -> TrainState:
    """Train to `config.epochs`, from scratch or from a checkpoint; calls `on_epoch` after each epoch."""
    seed_everything(config.seed)
    device = pick_device(config.device)
    (train_x, train_y), (val_x, val_y) = split(mnist, config)
    state = new_state(config, device, steps_per_epoch=math.ceil(len(train_x) / config.batch_size))
    if resume is not None:
        state.restore(resume)
    # One generator drives shuffling and augmentation; re-seeded per epoch so a resumed
    # run sees the same batches as an uninterrupted one.
    generator = torch.Generator()
    for epoch in range(state.epoch + 1, config.epochs + 1):
        generator.manual_seed(config.seed * 1000 + epoch)
        started = time.perf_counter()
        train_loss = train_epoch(
            state.model,
            device,
            train_x,
            train_y,
            state.optimizer,
            state.scheduler,
            config,
            generator,
            progress=f"epoch {epoch}/{config.epochs}",
        )
        val_loss, val_accuracy, _ = evaluate(state.model, device, val_x, val_y)
        result = EpochResult(epoch, train_loss, val_loss, val_accuracy, time.perf_counter() - started)
        state.history.append(result)
        state.epoch = epoch
        print(
            f"epoch {epoch}/{config.epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
            f"val accuracy {val_accuracy:.2%}  {result.seconds:.0f} s",
            file=sys.stderr,
        )
        on_epoch(state)
    return state
