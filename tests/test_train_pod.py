"""The training chart's pod script (charts/mnist-train, templates/job.yaml) run for real on this machine: each rank a
process with its JOB_COMPLETION_INDEX, torchrun's static rendezvous on rank 0 at localhost, the local Cassandra
node's MNIST tables. Rank 0 archives and publishes, its publish line its termination message; the other rank says it
is done and writes no archive. Paths the pod has and this machine lacks (/work/out, /dev/termination-log) are
replaced by a folder of the test's own; nothing else in the script is changed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helm_chart import KUBE_VERSION, ROOT, TRAIN_CHART, run_helm

pytestmark = [pytest.mark.cassandra, pytest.mark.slow]

# Small and quick, but a real run: data from the tables, one epoch, export, archive, publish.
TRAIN_FLAGS = "--epochs 1 --train-limit 512 --val-size 256 --seed 3"


def pod_script(helm, tmp_path: Path, rank: int, *values: str) -> Path:
    """The script rank RANK runs, with the pod's own paths moved under tmp_path."""
    done = run_helm(
        helm,
        "template",
        "t",
        str(TRAIN_CHART),
        "--kube-version",
        KUBE_VERSION,
        "--show-only",
        "templates/job.yaml",
        *values,
    )
    assert done.returncode == 0, done.stderr
    script = yaml.safe_load(done.stdout)["spec"]["template"]["spec"]["containers"][0]["args"][0]
    path = tmp_path / f"rank{rank}.sh"
    path.write_text(
        script.replace("/dev/termination-log", str(tmp_path / f"termination-log-{rank}")).replace(
            "/work/out", str(tmp_path / f"out-{rank}")
        )
    )
    return path


def rank_env(base: dict[str, str], rank: int, ranks: int, **more: str) -> dict[str, str]:
    """What the chart's env gives the container, pointed at this machine."""
    return {
        **base,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # torchrun and python of the project's venv
        "JOB_COMPLETION_INDEX": str(rank),
        "MNIST_TRAIN_RANKS": str(ranks),
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": "29531",
        "RENDEZVOUS_TIMEOUT": "120",
        "DEVICE": "cpu",
        "TRAIN_FLAGS": TRAIN_FLAGS,
        "MNIST_TRAIN_JOB": "t-mnist-train",
        "MNIST_TRAIN_IMAGE": "mnist-serve:0.1.0-cpu-train",
        **more,
    }


def test_two_ranks_rendezvous_and_rank_zero_alone_archives_and_publishes(helm, full_load, cassandra_env, tmp_path):
    assert full_load.returncode == 0, full_load.stderr
    scripts = [pod_script(helm, tmp_path, rank, "--set", "ranks=2") for rank in (0, 1)]
    ranks = [
        subprocess.Popen(
            ["bash", str(scripts[rank])],
            env=rank_env(cassandra_env, rank, 2),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (1, 0)
    ]
    logs = [rank.communicate(timeout=600)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], "\n".join(log[-3000:] for log in logs)

    message = (tmp_path / "termination-log-0").read_text()
    match = re.match(r"published version (\S+): mnist\.mar, ", message)
    assert match, message
    assert (tmp_path / "termination-log-1").read_text() == "rank 1 of 2: trained; rank 0 archives and publishes\n"
    assert (tmp_path / "out-0" / "model-store" / "mnist.mar").is_file()
    assert not (tmp_path / "out-1" / "model-store").exists()  # the other rank never archives or publishes
    shown = subprocess.run(
        [sys.executable, "-m", "registry.cli", "show", match.group(1)],
        cwd=ROOT,
        env=cassandra_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0 and "test accuracy" in shown.stdout, shown.stdout + shown.stderr


def test_a_rank_that_cannot_find_rank_zero_gives_up_in_time_and_names_the_address(helm, tmp_path):
    script = pod_script(helm, tmp_path, 1, "--set", "ranks=2")
    done = subprocess.run(
        ["bash", str(script)],
        env=rank_env(
            {"PATH": os.environ["PATH"]},
            1,
            2,
            MASTER_ADDR="t-mnist-train-0.t-mnist-train.invalid",
            RENDEZVOUS_TIMEOUT="3",
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    line = (tmp_path / "termination-log-1").read_text()
    assert line.startswith(
        "rank 1 of 2: rank 0's address t-mnist-train-0.t-mnist-train.invalid did not resolve within 3s"
    )
    assert line.strip() in done.stderr and not (tmp_path / "out-1").exists()  # nothing started
