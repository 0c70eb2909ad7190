"""The training job end to end: data in; model.pt, metrics.json and plots out, all or nothing."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from training import distributed, export, report, shares
from training.data import Mnist, MnistSource, Share
from training.model import Net, count_macs
from training.train import TrainConfig, TrainState, evaluate, to_tensors, train

MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
# Written in this order, metrics.json last: its presence says the rest is complete.
OUTPUTS = (MODEL_FILE, "training-curve.png", "confusion-matrix.png", METRICS_FILE)


def save_checkpoint(state: TrainState, config: TrainConfig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state.checkpoint(config), tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, config: TrainConfig) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ValueError(f"--resume {path}: no such checkpoint file") from None
    except Exception as error:  # torch raises many kinds for a damaged file
        raise ValueError(f"--resume {path}: not a readable checkpoint ({error})") from None
    return check_resumable(checkpoint, config, path)


def check_resumable(checkpoint: dict, config: TrainConfig, name) -> dict:
    """A checkpoint from a file or the database must belong to a run with this many epochs."""
    planned = checkpoint.get("config", {}).get("epochs", config.epochs)
    if planned != config.epochs:
        raise ValueError(
            f"--resume {name}: the checkpoint belongs to a {planned}-epoch run (its learning-rate schedule "
            f"spans {planned} epochs); resume with --epochs {planned}"
        )
    return checkpoint


def fingerprint(data: Mnist | Share) -> str:
    """Of the whole data set: from the pixels where one process holds them all, else as the shares worked it out."""
    return data.fingerprint() if isinstance(data, Mnist) else data.fingerprint


def run(
    source: MnistSource,
    config: TrainConfig,
    out: Path,
    resume: dict | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
) -> dict | None:
    """Train, test, export and verify; then move every output into `out` at once. Returns the metrics.
    Under torchrun every rank calls it: each trains on its share, rank 0 alone writes and returns the metrics,
    the others return None."""
    started = time.perf_counter()
    world, main = distributed.size(), distributed.is_main()
    if world == 1:
        mnist = source.load()
        print(
            f"data: {len(mnist.train_images):,} training and {len(mnist.test_images):,} test images from "
            f"{mnist.origin}",
            file=sys.stderr,
        )
    else:
        mnist = shares.load_share(source, distributed.rank(), world)
        tested = f" and {len(mnist.test_images):,} test images" if main else ""
        distributed.log(
            f"{distributed.name()}: data: {len(mnist.train_ids):,} of the {mnist.train_total:,} training "
            f"images{tested} from {mnist.origin}"
        )
    if main:
        out.mkdir(parents=True, exist_ok=True)

    def checkpoint(state: TrainState) -> None:
        save_checkpoint(state, config, out / CHECKPOINT_FILE)
        if on_epoch is not None:  # e.g. the database as well (--checkpoints cassandra)
            on_epoch(state)

    state = train(mnist, config, resume, on_epoch=checkpoint if main else lambda state: None)
    if not main:
        return None
    train_seconds = time.perf_counter() - started
    trained_on = str(next(state.model.parameters()).device)

    test_x, test_y = to_tensors(mnist.test_images, mnist.test_labels)
    # Scored on the CPU, where the exported model is checked and served.
    test_loss, test_accuracy, predicted = evaluate(state.model.cpu(), torch.device("cpu"), test_x, test_y)
    # Stage everything beside `out`, so a failure below leaves the previous outputs as they were.
    with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as staging:
        staging = Path(staging)
        worst = export.export(state.model, test_x, staging / MODEL_FILE)
        report.plot_training_curve(state.history, staging / "training-curve.png")
        matrix = report.confusion_matrix(test_y.numpy(), predicted.numpy())
        report.plot_confusion_matrix(
            matrix, staging / "confusion-matrix.png", f"MNIST test set, accuracy {test_accuracy:.2%}"
        )
        metrics = {
            "test_accuracy": test_accuracy,
            "test_loss": test_loss,
            "test_images": len(test_y),
            "epochs": config.epochs,
            "train_seconds": round(train_seconds, 1),
            "history": [asdict(h) for h in state.history],
            "data_fingerprint": fingerprint(mnist),
            "data_origin": mnist.origin,
            "seed": config.seed,
            "device": trained_on,
            "parameters": asdict(config),
            "model": {
                "class": Net.__name__,
                "multiply_adds": count_macs(Net()),
                "weights": sum(p.numel() for p in state.model.parameters()),
            },
            "export": {"format": "torchscript", "max_logit_difference": worst, "tolerance": export.LOGIT_TOLERANCE},
            "confusion_matrix": matrix.tolist(),
            **report.environment(),
            **report.lineage(world),
        }
        report.write_json(staging / METRICS_FILE, metrics)
        (out / METRICS_FILE).unlink(missing_ok=True)  # the old metrics must not vouch for a half-moved set
        for name in OUTPUTS:
            (staging / name).replace(out / name)
    return metrics
