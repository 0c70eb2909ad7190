"""Training as several ranks under torchrun (gloo, two processes on this machine): the shares, the same model
quality as one process, rank 0 the only writer, resuming across a change in the number of ranks, a rank killed
mid-run, and bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from registry import db
from training import distributed, job, shares
from training.cli import main
from training.data import DataError, DownloadedMnist, Mnist, row_digests, rows_fingerprint, share_of
from training.train import TrainConfig, check_every_rank_has_images, new_state, restore, split, step_bounds

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
OUTPUTS = {"model.pt", "metrics.json", "training-curve.png", "confusion-matrix.png", "checkpoint.pt"}
# Big enough that one and two ranks land within a few tenths of a point of each other (99.0 +- 0.1 % over
# seeds 1-3 on this machine), small enough for about 15 s of training on two cores.
CONFIG = TrainConfig(epochs=3, train_limit=30_000, val_size=1000, seed=1, device="cpu")
SUBSET = ["--epochs", "3", "--train-limit", "30000", "--val-size", "1000", "--seed", "1", "--device", "cpu"]
# Every rank in a directory of its own, as ranks in pods are: what rank 1 writes would land in r1/.
IN_OWN_DIRECTORY = 'mkdir -p "r$RANK" && cd "r$RANK" && exec "$0" -m training train "$@"'


def torchrun_command(ranks: int, *train_args: str) -> list[str]:
    return [
        str(TORCHRUN),
        "--standalone",  # a free port of its own, so runs beside other tests' never meet
        "--nproc-per-node",
        str(ranks),
        "--no-python",
        "bash",
        "-c",
        IN_OWN_DIRECTORY,
        sys.executable,
        "--rank-timeout",
        "60",
        *train_args,
    ]


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    # The ranks run in their own directories: PYTHONPATH makes them import this checkout's code.
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}


def torchrun(cwd: Path, ranks: int, *train_args: str, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_command(ranks, *train_args),
        cwd=cwd,
        env=environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# --- the shares and the steps, as pure functions -------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_idx_shards_are_disjoint_and_cover_the_set(world):
    count = 1001
    parts = [distributed.shard(count, rank, world) for rank in range(world)]
    together = np.concatenate(parts)
    assert len(together) == count and np.array_equal(np.sort(together), np.arange(count))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_token_shares_are_disjoint_and_cover_the_ring(world):
    parts = [shares.token_share(rank, world) for rank in range(world)]
    assert parts[0][0] == db.MIN_TOKEN and parts[-1][1] == db.MAX_TOKEN
    for (_, end), (start, _) in zip(parts, parts[1:], strict=False):
        assert end == start  # (start, end] ranges: each token in exactly one
    assert all(start < end for start, end in parts)
    # A rank's share, split again for parallel reads, covers exactly that share.
    sub = db.token_ranges(5, parts[-1])
    assert sub[0][0] == parts[-1][0] and sub[-1][1] == parts[-1][1]


def test_validation_and_training_images_are_the_same_whatever_the_ranks():
    rng = np.random.default_rng(0)
    mnist = Mnist(
        rng.integers(0, 255, (103, 28, 28), np.uint8), np.arange(103, dtype=np.uint8) % 10, *[np.zeros(0)] * 2, "test"
    )
    config = TrainConfig(train_limit=80, val_size=7)
    (one_x, _), (one_val, _) = split(mnist, config)
    for world in (2, 3):
        parts = [split(share_of(mnist, distributed.shard(103, r, world), r == 0), config) for r in range(world)]
        for which, whole in ((0, one_x), (1, one_val)):
            pixels = sorted(image.numpy().tobytes() for part in parts for image in part[which][0])
            assert pixels == sorted(image.numpy().tobytes() for image in whole)


def test_every_rank_takes_the_same_steps_and_one_process_plain_batches():
    assert step_bounds(250, 250, 100) == [(0, 100), (100, 200), (200, 250)]
    counts = [30_000 // 7 + (r < 30_000 % 7) for r in range(7)]
    bounds = [step_bounds(count, 30_000, 128) for count in counts]
    assert {len(b) for b in bounds} == {235}  # ceil(30,000 / 128): the same on every rank
    for step in range(235):
        images = sum(end - start for b in bounds for start, end in [b[step]])
        assert abs(images - min(128, 30_000 - 128 * step)) <= 7
    assert [b[-1][1] for b in bounds] == counts


def test_more_ranks_than_images_is_one_line():
    with pytest.raises(DataError, match="rank 2 of 3 gets no training images: there are 2 to share out; start no more"):
        check_every_rank_has_images([1, 1, 0])


def test_a_checkpoint_that_does_not_fit_is_one_line():
    config, cpu = TrainConfig(epochs=2), torch.device("cpu")
    saved = new_state(config, cpu, steps_per_epoch=10).checkpoint(config)
    with pytest.raises(ValueError, match="has 10 steps per epoch, this run's 12; resume with the --batch-size"):
        restore(new_state(config, cpu, steps_per_epoch=12), saved, config)
    saved["model_state_dict"].pop("classifier.weight")
    with pytest.raises(ValueError, match='does not fit this model .*Missing key.*"classifier.weight"'):
        restore(new_state(config, cpu, steps_per_epoch=10), saved, config)


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0: training needs at least 1 rank"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is outside 0..1 for WORLD_SIZE=2"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
    ],
)
def test_a_bad_world_is_one_line(variables, message):
    with pytest.raises(distributed.DistributedError, match=re.escape(message)):
        distributed.from_environment(variables)
    assert distributed.from_environment({}) is None  # no torchrun: one process, no process group


def test_a_bad_world_stops_the_cli_before_anything_starts(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "training", "train", "--out", str(tmp_path / "out")],
        env=environment({"WORLD_SIZE": "0", "RANK": "0"}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: WORLD_SIZE=0: training needs at least 1 rank (torchrun --nnodes and --nproc-per-node of 1 or more)"
    ]
    assert not (tmp_path / "out").exists()


def test_rank_0_unreachable_is_one_line_naming_its_address(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "training", "train", "--rank-timeout", "2", "--out", str(tmp_path / "out")],
        env=environment({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and time.monotonic() - started < 60
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: rank 1 of 2: gave up waiting for rank 0 at 127.0.0.1:{port} (--rank-timeout 2 s")
    assert not (tmp_path / "out").exists()


# --- real runs: one process in this one, two ranks under torchrun --------------------------------------------


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """The subset trained by one process, as `mnist-train train` runs it, with its epoch-2 checkpoint kept."""
    out = tmp_path_factory.mktemp("one-rank") / "out"

    def keep_epoch_2(state):
        if state.epoch == 2:
            job.save_checkpoint(state, CONFIG, out.parent / "epoch-2.pt")

    job.run(DownloadedMnist(), CONFIG, out, on_epoch=keep_epoch_2)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("two-ranks")
    done = torchrun(cwd, 2, "--out", "out", *SUBSET)
    assert done.returncode == 0, done.stdout[-3000:]
    return cwd, done


def test_two_ranks_reach_the_accuracy_of_one(one_rank, two_ranks):
    cwd, done = two_ranks
    one, two = metrics(one_rank), metrics(cwd / "r0" / "out")
    assert two["test_images"] == 10_000 and sum(map(sum, two["confusion_matrix"])) == 10_000
    assert abs(two["test_accuracy"] - one["test_accuracy"]) <= 0.005, (one["test_accuracy"], two["test_accuracy"])
    assert one["world_size"] == 1 and two["world_size"] == 2
    # The same data, named the same way: every rank holds the files whole.
    assert two["data_fingerprint"] == one["data_fingerprint"]
    assert two["parameters"] == one["parameters"] and len(two["history"]) == 3
    # Each rank trained on its half and said so once per epoch; the figures are the reduced ones.
    for rank in (0, 1):
        assert f"rank {rank} of 2: data: 30,000 of the 60,000 training images" in done.stdout
        lines = re.findall(
            rf"^rank {rank} of 2: epoch \d/3 .*\(15,000 of the 30,000 training images here\)$", done.stdout, re.M
        )
        assert len(lines) == 3, done.stdout[-3000:]


def test_only_rank_0_writes(one_rank, two_ranks):
    cwd, _ = two_ranks
    assert {path.name for path in (cwd / "r0" / "out").iterdir()} == OUTPUTS
    assert {path.name for path in one_rank.iterdir()} == OUTPUTS
    assert not (cwd / "r1" / "out").exists() and list((cwd / "r1").iterdir()) == []
    # The saved and exported models are the plain Net: no DDP "module." prefix.
    checkpoint = torch.load(cwd / "r0" / "out" / "checkpoint.pt", weights_only=False)
    assert not [key for key in checkpoint["model_state_dict"] if key.startswith("module.")]
    exported = torch.jit.load(str(cwd / "r0" / "out" / "model.pt"))
    assert exported(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape == (2, 10)


def test_one_rank_checkpoint_resumes_on_two(one_rank, tmp_path):
    done = torchrun(tmp_path, 2, "--out", "out", "--resume", str(one_rank.parent / "epoch-2.pt"), *SUBSET)
    assert done.returncode == 0, done.stdout[-3000:]
    resumed, one = metrics(tmp_path / "r0" / "out"), metrics(one_rank)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == one["history"][:2]  # the first two epochs are the one process's
    assert abs(resumed["test_accuracy"] - one["test_accuracy"]) <= 0.005
    assert "epoch 1/3" not in done.stdout and "rank 1 of 2: epoch 3/3" in done.stdout


def test_a_killed_rank_fails_the_run_and_its_checkpoint_resumes_on_one(tmp_path, one_rank):
    """Rank 1 killed in epoch 2: torchrun stops the run and names the rank; nothing is written as if finished,
    and the epoch-1 checkpoint that rank 0 saved continues in one process."""
    run = subprocess.Popen(
        torchrun_command(2, "--out", "out", *SUBSET),
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, seen = tmp_path / "r0" / "out", []
    try:
        for line in run.stdout:
            seen.append(line)
            if line.startswith("rank 0 of 2: epoch 1/3"):
                break
        pid = int(re.search(r"^rank 1 of 2 \(pid (\d+)\)", "".join(seen), re.M).group(1))
        deadline = time.monotonic() + 60
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        rest, _ = run.communicate(timeout=120)
    finally:
        run.kill()
    log = "".join(seen) + rest
    assert run.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*-9", log), log[-3000:]
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1

    resumed_out = tmp_path / "resumed"
    assert main(["train", "--out", str(resumed_out), "--resume", str(out / "checkpoint.pt"), *SUBSET]) == 0
    resumed = metrics(resumed_out)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3] and resumed["world_size"] == 1
    assert abs(resumed["test_accuracy"] - metrics(one_rank)["test_accuracy"]) <= 0.005


def test_more_ranks_than_training_images_stops_every_rank(tmp_path):
    done = torchrun(tmp_path, 2, "--out", "out", "--train-limit", "1", "--val-size", "1", "--epochs", "1")
    assert done.returncode != 0
    # Both ranks stop with the same line (each checks the counts of all).
    assert done.stdout.count("error: rank 1 of 2 gets no training images: there are 1 to share out") == 2
    assert not (tmp_path / "r0" / "out" / "metrics.json").exists() and not (tmp_path / "r1" / "out").exists()


# --- from Cassandra: each rank reads its part of the token ring --------------------------------------------------


@pytest.mark.cassandra
def test_two_ranks_from_cassandra_read_half_each(full_load, cassandra, cassandra_env, mnist, tmp_path):
    assert full_load.returncode == 0, full_load.stderr
    done = torchrun(
        tmp_path,
        2,
        "--out",
        "out",
        "--source",
        "cassandra",
        "--checkpoints",
        "cassandra",
        "--epochs",
        "1",
        "--train-limit",
        "2000",
        "--val-size",
        "500",
        env={**cassandra_env, "MNIST_TRAIN_JOB": "mnist-train-test", "MNIST_TRAIN_IMAGE": "mnist-train:test"},
    )
    assert done.returncode == 0, done.stdout[-3000:]
    counts = re.findall(r"^rank \d of 2: data: ([\d,]+) of the 60,000", done.stdout, re.M)
    read = [int(count.replace(",", "")) for count in counts]
    assert len(read) == 2 and sum(read) == 60_000 and max(read) < 60_000
    found = metrics(tmp_path / "r0" / "out")
    # Read in shares, the data is named by its rows' digests: the same for any number of ranks.
    whole = rows_fingerprint(
        row_digests(mnist.train_images, mnist.train_labels), row_digests(mnist.test_images, mnist.test_labels)
    )
    assert found["data_fingerprint"] == whole
    assert found["world_size"] == 2 and found["job"] == "mnist-train-test" and found["image"] == "mnist-train:test"
    run_id = re.search(r"as run (\S+) ", done.stdout).group(1)
    epochs = [row[0] for row in cassandra.execute("SELECT epoch FROM checkpoints WHERE run_id = %s", (run_id,))]
    assert epochs == [1]  # from rank 0 alone
    assert done.stdout.count("checkpoints: each epoch goes to the database") == 1
    assert not (tmp_path / "r1" / "out").exists()


# --- make bench-train's layouts and table ------------------------------------------------------------------------


def test_bench_train_compares_one_rank_with_every_core_and_two_ranks(monkeypatch):
    from bench import train as bench_train

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert bench_train.layouts(torch.device("cpu")) == ([(1, 2), (2, 1)], None)
    shown = bench_train.table(
        [bench_train.Figures(1, 2, "cpu", 20_000, 2.5, 2.5), bench_train.Figures(2, 1, "cpu", 20_000, 4.0, 3.0)], 128
    )
    assert "1 x 2            cpu          8,000     2.50     15.9  -" in shown
    assert "2 x 1            cpu          5,000     4.00     25.5  25% (6.4 ms)" in shown
    assert "2 x 1 against 1 x 2: 0.62x the images/s" in shown
