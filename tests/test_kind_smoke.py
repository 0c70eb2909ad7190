"""The chart on a real kind cluster (k8s/kind-smoke.sh): image built and loaded, helm install, a digit
answered through a port-forward, helm test, a failing pod's status message. Needs Docker and kind; where
they are missing the script refuses at once, and tests/test_chart.py checks the rendered chart instead."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from training.config import cache_dir

ROOT = Path(__file__).resolve().parents[1]


def missing() -> list[str]:
    needs = []
    if not shutil.which("docker") or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        needs.append("a running Docker engine")
    if not shutil.which("kind") and not (cache_dir() / "bin" / "kind").exists():
        needs.append("kind")
    return needs


def test_without_docker_or_kind_the_smoke_test_refuses_at_once():
    if not missing():
        pytest.skip("Docker and kind are here: test_kind_smoke_test_passes runs the smoke test itself")
    done = subprocess.run([str(ROOT / "k8s" / "kind-smoke.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("error: the kind smoke test needs ") and "it cannot run here" in done.stderr
    assert all(need in done.stderr for need in missing())


def kind_missing() -> bool:
    return "kind" in missing()


# Docker is no reason to skip: tests/test_container.py starts an engine where none runs. kind is: no
# project script builds it or its node image yet (the kind issue does).
@pytest.mark.slow
@pytest.mark.skipif(kind_missing(), reason="needs kind and a node image, which no project script builds yet; "
                    "tests/test_chart.py and tests/test_chart_cluster.py check the chart without them")
def test_kind_smoke_test_passes():
    done = subprocess.run(["make", "--no-print-directory", "kind-smoke"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "kind smoke test passed" in done.stdout
