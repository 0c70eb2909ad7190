"""The chart installed with helm on a real Kubernetes API server and scheduler: the local cluster of
scripts/cluster.sh, whose simulated nodes are shaped like the EKS node groups (k8s/kwok/nodes.yaml: CPU nodes,
and GPU nodes with nvidia.com/gpu and the GPU taint). The server accepts every object, GPU pods land on GPU
nodes only and CPU pods never do, and a bad value is refused by `helm install` before anything is created."""
from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from test_chart import CHART
from test_chart import helm  # noqa: F401 (a fixture)
from training.config import cache_dir

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def cluster_script(command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "cluster.sh"), command], capture_output=True, text=True, timeout=2400)


@pytest.fixture(scope="module")
def kubeconfig() -> Path:
    """The cluster, started if it was not running (and then stopped again at the end)."""
    was_running = cluster_script("status").returncode == 0
    started = cluster_script("up")
    if started.returncode != 0:
        pytest.fail(f"scripts/cluster.sh up failed:\n{started.stdout[-3000:]}{started.stderr[-3000:]}")
    yield cache_dir() / "kubeconfig"
    if not was_running:
        cluster_script("down")


def kubectl(kubeconfig: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 or not check, done.stderr
    return done


@pytest.fixture
def namespace(kubeconfig) -> str:
    name = f"chart-test-{secrets.token_hex(3)}"
    kubectl(kubeconfig, "create", "namespace", name)
    yield name
    kubectl(kubeconfig, "delete", "namespace", name, "--wait=false", check=False)


def install(helm: Path, kubeconfig: Path, namespace: str, release: str, *values: str) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run(
        [str(helm), "install", release, str(CHART), f"--kubeconfig={kubeconfig}", "--namespace", namespace,
         "--wait", "--timeout", "3m", *values],
        capture_output=True, text=True, timeout=400,
    )


def nodes_of(kubeconfig: Path, namespace: str, release: str) -> list[str]:
    pods = json.loads(kubectl(kubeconfig, "get", "pods", "--namespace", namespace, "--output", "json",
                              "--selector", f"app.kubernetes.io/instance={release},app.kubernetes.io/component=server").stdout)["items"]
    assert pods, "no pods"
    return sorted(pod["spec"].get("nodeName", "") for pod in pods)


def test_gpu_pods_run_on_gpu_nodes_and_cpu_pods_off_them(helm, kubeconfig, namespace):  # noqa: F811
    # The Secrets the EKS values name; their content does not matter here (the pods are simulated).
    for name, key in (("mnist-serve-astra-bundle", "secure-connect-bundle.zip"), ("mnist-serve-astra-token", "token")):
        kubectl(kubeconfig, "create", "secret", "generic", name, "--namespace", namespace, f"--from-literal={key}=placeholder")

    gpu = install(helm, kubeconfig, namespace, "gpu", "--values", str(CHART / "values-eks-gpu.yaml"))
    assert gpu.returncode == 0, gpu.stderr
    assert "kubectl --namespace %s port-forward service/gpu-mnist-serve 8080:8080" % namespace in gpu.stdout  # NOTES.txt
    # Installed with one pod (the Deployment leaves the count to the autoscaler), then raised to the
    # autoscaler's minReplicas (2) by the HPA controller within its 15 s sync period.
    deadline = time.monotonic() + 120
    while len(gpu_nodes := nodes_of(kubeconfig, namespace, "gpu")) < 2 or "" in gpu_nodes:
        assert time.monotonic() < deadline, f"the autoscaler did not reach minReplicas: {gpu_nodes}"
        time.sleep(2)
    assert len(gpu_nodes) == 2 and all(node.startswith("gpu-") for node in gpu_nodes), gpu_nodes
    # Spread over the two zones (one GPU node each), as topologySpreadConstraints asks.
    assert len(set(gpu_nodes)) == 2

    cpu = install(helm, kubeconfig, namespace, "cpu")
    assert cpu.returncode == 0, cpu.stderr
    assert all(node.startswith("cpu-") for node in nodes_of(kubeconfig, namespace, "cpu"))

    # Every kind the chart makes is now in the cluster, as the API server stored it.
    stored = kubectl(kubeconfig, "get", "deployment,service,configmap,serviceaccount,networkpolicy,poddisruptionbudget,horizontalpodautoscaler",
                     "--namespace", namespace, "--selector", "app.kubernetes.io/instance=gpu", "--output", "name").stdout.split()
    assert {name.split("/")[0] for name in stored} >= {
        "deployment.apps", "service", "configmap", "serviceaccount", "networkpolicy.networking.k8s.io",
        "poddisruptionbudget.policy", "horizontalpodautoscaler.autoscaling"}


def test_a_gpu_pod_asking_for_more_gpus_than_a_node_has_is_not_scheduled(helm, kubeconfig, namespace):  # noqa: F811
    """nvidia.com/gpu is a real resource request: a pod wanting 2 stays Pending on 1-GPU nodes."""
    done = subprocess.run(
        [str(helm), "install", "greedy", str(CHART), f"--kubeconfig={kubeconfig}", "--namespace", namespace,
         "--set", "gpu.enabled=true", "--set", "gpu.count=2", "--set", "replicaCount=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    kubectl(kubeconfig, "wait", "--namespace", namespace, "--for=condition=PodScheduled=false", "pod",
            "--selector", "app.kubernetes.io/instance=greedy", "--timeout=60s")
    events = kubectl(kubeconfig, "get", "events", "--namespace", namespace, "--field-selector", "reason=FailedScheduling", "--output", "json").stdout
    assert "Insufficient nvidia.com/gpu" in events


def test_a_bad_value_is_refused_at_install_time(helm, kubeconfig, namespace):  # noqa: F811
    done = install(helm, kubeconfig, namespace, "bad", "--set", "replicaCount=two")
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr and "at '/replicaCount'" in done.stderr
    releases = subprocess.run([str(helm), "list", f"--kubeconfig={kubeconfig}", "--namespace", namespace, "--all", "--short"],
                              capture_output=True, text=True, timeout=60)
    assert "bad" not in releases.stdout.split()
    assert not kubectl(kubeconfig, "get", "all", "--namespace", namespace, "--output", "name").stdout.strip()
