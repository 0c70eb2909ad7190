"""What a training run leaves behind for people: metrics.json, a training curve, a confusion matrix."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from training.train import EpochResult  # noqa: E402

CHECKOUT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = CHECKOUT) -> str:
    """The commit the code came from, '-dirty' when it had uncommitted changes. Outside git (the training
    image has no .git): MNIST_SERVE_GIT_COMMIT, which the image's build sets, else 'unknown'."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return os.environ.get("MNIST_SERVE_GIT_COMMIT") or "unknown"
    return commit + ("-dirty" if dirty else "")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def plot_training_curve(history: list[EpochResult], path: Path) -> None:
    epochs = [h.epoch for h in history]
    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    losses.plot(epochs, [h.train_loss for h in history], "o-", label="training (augmented)")
    losses.plot(epochs, [h.val_loss for h in history], "o-", label="validation")
    losses.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss", yscale="log")
    losses.legend()
    accuracy.plot(epochs, [100 * h.val_accuracy for h in history], "o-", color="tab:green")
    accuracy.set(xlabel="epoch", ylabel="accuracy (%)", title="Validation accuracy")
    for axis in (losses, accuracy):
        axis.grid(alpha=0.3)
        axis.set_xticks(epochs)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_confusion_matrix(matrix: np.ndarray, path: Path, title: str) -> None:
    figure, axis = plt.subplots(figsize=(7, 6))
    # Log colour scale: the diagonal holds ~1,000 per digit, the mistakes a handful.
    image = axis.imshow(matrix + 1, cmap="Blues", norm=matplotlib.colors.LogNorm())
    for true in range(10):
        for predicted in range(10):
            count = matrix[true, predicted]
            if count:
                axis.text(
                    predicted,
                    true,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if true == predicted else "black",
                )
    axis.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit", title=title)
    figure.colorbar(image, ax=axis, label="images (log scale)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def environment() -> dict:
    return {"torch_version": torch.__version__, "git_commit": git_commit()}


# Set by whatever starts the job (the training chart, from the Job's name and its image), so that a published
# version can say which run made it.
LINEAGE_VARIABLES = {"job": "MNIST_TRAIN_JOB", "image": "MNIST_TRAIN_IMAGE"}


def lineage(world_size: int) -> dict:
    """How the run was made: its number of ranks, and the Job and image where the environment names them."""
    found = {key: os.environ[name] for key, name in LINEAGE_VARIABLES.items() if os.environ.get(name)}
    return {"world_size": world_size, **found}
