"""The training job: a smoke run on a subset, reproducibility, resume, the CLI and its errors."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from training.cli import main
from training.data import load_mnist
from training.train import TrainConfig, train

pytestmark = pytest.mark.slow

SMOKE = dict(epochs=2, train_limit=3000, val_size=1000, batch_size=100, lr=0.01, device="cpu")


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_smoke_run_learns(mnist):
    state = train(mnist, TrainConfig(**SMOKE))
    first, last = state.history
    assert last.train_loss < first.train_loss
    assert last.val_accuracy > 0.85  # chance is 0.10


def test_same_seed_same_model(mnist):
    config = TrainConfig(**{**SMOKE, "epochs": 1})
    a, b = train(mnist, config), train(mnist, config)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert a.history[0].val_accuracy == b.history[0].val_accuracy


def test_resume_continues_where_the_checkpoint_stopped(mnist, tmp_path):
    config = TrainConfig(**SMOKE)
    whole = train(mnist, config)
    checkpoints = []
    train(
        mnist,
        config,
        on_epoch=lambda s: checkpoints.append(copy.deepcopy(s.checkpoint(config))) if s.epoch == 1 else None,
    )
    resumed = train(mnist, config, resume=checkpoints[0])
    assert [h.epoch for h in resumed.history] == [1, 2]
    for (name, x), (_, y) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_job_writes_complete_outputs(tmp_path):
    out = tmp_path / "artifacts"
    assert main(["train", "--out", str(out), *[f"--{k.replace('_', '-')}={v}" for k, v in SMOKE.items()]]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.85 < metrics["test_accuracy"] <= 1
    assert metrics["test_images"] == 10_000 and metrics["epochs"] == 2 and len(metrics["history"]) == 2
    assert len(metrics["data_fingerprint"]) == 64 and metrics["torch_version"] == torch.__version__
    assert metrics["export"]["max_logit_difference"] <= 1e-4
    assert sum(map(sum, metrics["confusion_matrix"])) == 10_000
    for name in ("model.pt", "training-curve.png", "confusion-matrix.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 1000, name
    exported = torch.jit.load(str(out / "model.pt"))
    assert exported(torch.zeros(3, 1, 28, 28, dtype=torch.uint8)).shape == (3, 10)
    # --resume from the checkpoint it left: nothing left to train, same result.
    assert (
        main(
            [
                "train",
                "--out",
                str(out),
                "--resume",
                str(out / "checkpoint.pt"),
                *[f"--{k.replace('_', '-')}={v}" for k, v in SMOKE.items()],
            ]
        )
        == 0
    )
    again = json.loads((out / "metrics.json").read_text())
    assert again["test_accuracy"] == metrics["test_accuracy"]


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "training", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--epochs", "two"], "argument --epochs: must be a positive whole number, got 'two'"),
        (["train", "--batch-size", "0"], "argument --batch-size: must be a positive whole number"),
        (["train", "--colour", "red"], "unrecognized arguments: --colour red"),
        (["fly"], "invalid choice: 'fly'"),
    ],
)
def test_bad_flags_exit_non_zero_with_a_message(tmp_path, args, message):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_bad_data_dir_fails_in_one_line_and_writes_nothing(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    (data / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(100))
    result = run_cli("train", "--data-dir", str(data), "--out", "out", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "magic number 0x00000801, expected 0x00000803" in result.stderr
    assert not (tmp_path / "out" / "metrics.json").exists() and not (tmp_path / "out" / "model.pt").exists()


def test_resume_from_a_missing_checkpoint_is_an_error(tmp_path):
    result = run_cli("train", "--resume", "nope.pt", "--out", "out", cwd=tmp_path)
    assert result.returncode == 1 and "error: --resume nope.pt: no such checkpoint file" in result.stderr


def test_every_command_has_help(tmp_path):
    result = run_cli("train", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--resume" in result.stdout and "--data-dir" in result.stdout


def test_git_commit_outside_git_comes_from_the_image_build(tmp_path, monkeypatch):
    """The training image has no .git; docker/build.sh passes the commit, the Dockerfile sets MNIST_SERVE_GIT_COMMIT."""
    from training.report import git_commit

    monkeypatch.delenv("MNIST_SERVE_GIT_COMMIT", raising=False)
    assert git_commit(tmp_path) == "unknown"
    monkeypatch.setenv("MNIST_SERVE_GIT_COMMIT", "0123abc")
    assert git_commit(tmp_path) == "0123abc"
    assert git_commit() not in {"unknown", "0123abc"}  # in the checkout, git itself answers
