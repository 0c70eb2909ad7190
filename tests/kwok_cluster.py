"""The local Kubernetes control plane of scripts/cluster.sh (kube-apiserver, controller-manager and scheduler 1.36
with kwok-simulated nodes, k8s/kwok/nodes.yaml) as the tests use it: the fixtures `kubeconfig` and `api`, which
tests/conftest.py offers to every module. The cluster is started once for the session where it was not running,
and then stopped again at the end."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from kubernetes import client, config

from training.config import cache_dir

ROOT = Path(__file__).resolve().parents[1]


def cluster_script(command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "cluster.sh"), command], capture_output=True, text=True, timeout=2400)


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    """The cluster, started if it was not running (and then stopped again at the end)."""
    was_running = cluster_script("status").returncode == 0
    started = cluster_script("up")
    if started.returncode != 0:
        pytest.fail(f"scripts/cluster.sh up failed:\n{started.stdout[-3000:]}{started.stderr[-3000:]}")
    yield cache_dir() / "kubeconfig"
    if not was_running:
        cluster_script("down")


@pytest.fixture(scope="session")
def api(kubeconfig) -> client.ApiClient:
    with config.new_client_from_config(config_file=str(kubeconfig)) as api_client:
        yield api_client


def scheduler_refusal(api, namespace: str, pod: client.V1Pod, timeout: float = 60) -> str:
    """The scheduler's message on a pod it cannot place (its PodScheduled condition, Unschedulable), once it says it."""
    deadline = time.monotonic() + timeout
    while True:
        message = next(
            (
                c.message
                for c in pod.status.conditions or ()
                if c.type == "PodScheduled" and c.reason == "Unschedulable"
            ),
            "",
        )
        if message:
            return message
        assert time.monotonic() < deadline, pod.status
        time.sleep(1)
        pod = client.CoreV1Api(api).read_namespaced_pod(pod.metadata.name, namespace)


def one_pod_per_gpu_node_and_one_pending(api, namespace: str, pods: list[client.V1Pod]) -> None:
    """Three pods of one GPU each on the two one-GPU nodes: two run, one on each node, and the third stays Pending
    with the scheduler saying why."""
    assert sorted(pod.spec.node_name for pod in pods if pod.status.phase == "Running") == ["gpu-0", "gpu-1"]
    (pending,) = [pod for pod in pods if pod.status.phase == "Pending"]
    assert "Insufficient nvidia.com/gpu" in scheduler_refusal(api, namespace, pending)
    assert not pending.spec.node_name
