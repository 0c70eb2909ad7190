"""The charts as the tests render them: where they are (the serving chart, the training chart), the values files
and cases every render covers, the pinned helm (the fixture `helm`, which tests/conftest.py offers to every module)
and `helm template`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from training.config import cache_dir

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "mnist-serve"
TRAIN_CHART = ROOT / "charts" / "mnist-train"
KUBE_VERSION = "1.36.0"

CASES = {
    "default": [],
    "kind": ["--values", str(CHART / "values-kind.yaml")],
    "eks-gpu": ["--values", str(CHART / "values-eks-gpu.yaml")],
    # Every optional part on, so each is rendered and validated too.
    "everything": [
        "--values",
        str(CHART / "values-eks-gpu.yaml"),
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "gpu.runtimeClassName=nvidia",
        "--set",
        "networkPolicy.inferenceFrom[0].namespaceSelector.matchLabels.name=ingress",
        "--set",
        "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
        "--set",
        "networkPolicy.egressTo[0].ipBlock.cidr=10.0.0.0/8",
        "--set",
        "tests.image.repository=python",
        "--set",
        "tests.image.tag=3.11.14-slim-bookworm",
        "--set",
        "imagePullSecrets[0].name=registry",
        "--set",
        "priorityClassName=serving",
    ],
    # A self-hosted cluster with logins and TLS with client certificates (K8ssandra, a company cluster).
    "self-hosted": [
        "--set",
        "cassandra.hosts[0]=cassandra.db.svc",
        "--set",
        "cassandra.auth.secretName=cassandra-login",
        "--set",
        "cassandra.tls.enabled=true",
        "--set",
        "cassandra.tls.secretName=cassandra-tls",
        "--set",
        "cassandra.tls.clientCertificate=true",
    ],
}


@pytest.fixture(scope="session")
def helm() -> Path:
    """The pinned helm, built once by the project's own installer (a no-op when it is there)."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "install-k8s-tools.sh"), "helm"], capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return cache_dir() / "bin" / "helm"


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def render(helm: Path, *args: str, chart: Path = CHART, release: str = "mnist-serve") -> list[dict]:
    """Every object `helm template` renders (test hooks included), as dicts."""
    done = run_helm(
        helm, "template", release, str(chart), "--namespace", "serving", "--kube-version", KUBE_VERSION, *args
    )
    assert done.returncode == 0, done.stderr
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def refused(helm: Path, *args: str, chart: Path = CHART, release: str = "mnist-serve") -> str:
    """helm's error for values the chart must refuse."""
    done = run_helm(helm, "template", release, str(chart), "--kube-version", KUBE_VERSION, *args)
    assert done.returncode != 0, f"helm accepted {args}"
    return done.stderr


def server_pod(objects: list[dict]) -> dict:
    """The stable Deployment's pod template (not the canary's)."""
    (deployment,) = [o for o in objects if o["kind"] == "Deployment" and not o["metadata"]["name"].endswith("-canary")]
    return deployment["spec"]["template"]


def values_without_a_comment(path: Path, pass_through: set[str]) -> list[str]:
    """The lines of a values file whose key has no comment line right above it ("NUMBER: LINE"), outside the blocks
    named in pass_through (handed to Kubernetes as they are, documented by the comment above their own key)."""
    lines = path.read_text().splitlines()
    parents: list[tuple[int, str]] = []
    missing = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)(?:- )?([A-Za-z0-9_./-]+):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        inside_pass_through = any(parent in pass_through for _, parent in parents)
        if not inside_pass_through and not lines[number - 1].strip().startswith("#"):
            missing.append(f"{number + 1}: {line.strip()}")
        parents.append((indent, key))
    return missing
