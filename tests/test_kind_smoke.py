"""The chart on a real kind cluster (k8s/kind-smoke.sh, make kind-smoke): the node image built from package
registries where kind's own cannot be pulled, the serving image preloaded into it, helm install and test, digits
in every input form, uid and read-only root filesystem, the NetworkPolicy enforced, the registry path,
zero-downtime upgrades and a killed container under load, bad values and an unreachable registry. Plus the
pieces that can be checked alone: the docker wrapper kind uses where nodes cannot run privileged, the one-line
refusal, and the preloaded node image."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from reference_model import reference_model_dir

ROOT = Path(__file__).resolve().parents[1]
UNPRIVILEGED = ROOT / "k8s" / "kind" / "unprivileged"


def test_a_docker_engine_that_does_not_answer_is_one_line_within_seconds(tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    done = subprocess.run([str(ROOT / "k8s" / "kind-smoke.sh")], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: no Docker engine answers at DOCKER_HOST=unix://{tmp_path}/no-engine.sock ('docker info' fails)"]


def wrapped(tmp_path: Path, *arguments: str) -> list[str]:
    """What the wrapper hands the docker after it on PATH (here one that prints its arguments as JSON)."""
    real = tmp_path / "bin" / "docker"
    real.parent.mkdir()
    real.write_text('#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n')
    real.chmod(0o755)
    env = {**os.environ, "PATH": f"{UNPRIVILEGED}:{real.parent}:{os.environ['PATH']}"}
    done = subprocess.run(["docker", *arguments], capture_output=True, text=True, env=env, timeout=30, check=True)
    return json.loads(done.stdout)


def test_the_wrapper_turns_a_privileged_run_into_explicit_capabilities(tmp_path):
    got = wrapped(tmp_path, "run", "--name", "node", "--privileged", "--volume", "/var", "kindest/node:v1")
    assert "--privileged" not in got
    assert got[:3] == ["run", "--name", "node"] and got[-3:] == ["--volume", "/var", "kindest/node:v1"]
    assert {"--cap-add=ALL", "--cap-drop=SYS_RESOURCE", "--security-opt=systempaths=unconfined", "--device=/dev/kmsg"} <= set(got)


def test_the_wrapper_drops_privileged_from_exec_and_passes_the_rest_unchanged(tmp_path):
    assert wrapped(tmp_path, "exec", "--privileged", "-i", "node", "ctr", "images", "import", "-") == ["exec", "-i", "node", "ctr", "images", "import", "-"]


def test_the_wrapper_leaves_other_commands_alone(tmp_path):
    assert wrapped(tmp_path, "inspect", "--format", "{{.Id}}", "node") == ["inspect", "--format", "{{.Id}}", "node"]


def mounted_below(directory: Path) -> list[str]:
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if line.split()[1].startswith(f"{directory}/")]


def test_what_a_killed_node_image_build_left_mounted_is_unmounted_so_the_next_build_can_start_over(tmp_path):
    """debootstrap mounts /proc in the node's root filesystem; killed, it leaves it there, and the next build
    could not delete the directory (CI once failed so: 126,000 lines of 'rm: cannot remove .../proc/...')."""
    rootfs = tmp_path / "kind-node" / "rootfs"
    (rootfs / "proc").mkdir(parents=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True)
    (rootfs / "dev" / "shm").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(rootfs / "dev" / "shm")], check=True)
    try:
        assert mounted_below(tmp_path) == [str(rootfs / "proc"), str(rootfs / "dev" / "shm")]
        done = subprocess.run(["bash", "-c", 'source "$1" && unmount_below "$2"', "bash", str(ROOT / "k8s" / "kind" / "node-image.sh"),
                               str(tmp_path / "kind-node")], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert mounted_below(tmp_path) == []
    finally:
        for path in reversed(mounted_below(tmp_path)):
            subprocess.run(["umount", "--lazy", path])


@pytest.mark.slow
def test_a_preloaded_node_image_holds_the_serving_image_is_built_once_and_replaces_the_last_build(tmp_path):
    """k8s/kind/preload.sh on the smoke test's node image with a one-file image in place of the serving one."""
    subprocess.run([str(ROOT / "scripts" / "docker-engine.sh")], check=True)
    node = subprocess.run([str(ROOT / "k8s" / "kind" / "node-image.sh")], capture_output=True, text=True, check=True).stdout.split()[-1]
    serving = "mnist-serve-preload-test:1"

    def build_serving(content: str) -> None:
        (tmp_path / "file").write_text(content)
        done = subprocess.run(f"tar -C {tmp_path} -c file | docker import - {serving}", shell=True, check=True, capture_output=True, text=True)
        built.append(done.stdout.strip())

    def preload() -> tuple[str, str]:
        done = subprocess.run([str(ROOT / "k8s" / "kind" / "preload.sh"), node, serving], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[-1], done.stderr

    def inspect(image: str, field: str) -> str:
        return subprocess.run(["docker", "image", "inspect", "--format", f"{{{{json {field}}}}}", image],
                              capture_output=True, text=True).stdout.strip()

    container = f"mnist-serve-preload-test-{os.getpid()}"
    built = []
    try:
        build_serving("first")
        first, said = preload()
        built.append(first)
        assert re.search(r"^preload: built \S+ in \d+ s$", said, re.MULTILINE), said
        assert inspect(first, ".Config.Entrypoint") == inspect(node, ".Config.Entrypoint") != "null"
        # What the cluster's node will find in its containerd: this image beside the control plane's.
        subprocess.run(["docker", "run", "--detach", "--name", container, "--tmpfs", "/run", "--entrypoint", "containerd", first],
                       check=True, capture_output=True)
        held = ""
        for _ in range(60):
            done = subprocess.run(["docker", "exec", container, "ctr", "--namespace", "k8s.io", "images", "ls", "--quiet"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                held = done.stdout
                break
            time.sleep(0.5)
        assert f"docker.io/library/{serving}\n" in held and "kube-apiserver:" in held, held
        subprocess.run(["docker", "rm", "--force", container], check=True, capture_output=True)

        again, said = preload()
        assert again == first and "is there" in said

        build_serving("second")
        second, said = preload()
        built.append(second)
        assert second != first and "built" in said
        assert subprocess.run(["docker", "image", "inspect", first], capture_output=True).returncode != 0, "the last build's preloaded image stayed"
    finally:
        subprocess.run(["docker", "rm", "--force", container], capture_output=True)
        subprocess.run(["docker", "image", "rm", "--force", *built], capture_output=True)


@pytest.mark.slow
def test_kind_smoke_test_passes(archive):
    """The whole smoke test on the tests' archive (the reference model); its figures are printed with -s."""
    env = {**os.environ, "MODEL_ARCHIVE": str(archive), "MODEL_METRICS": str(reference_model_dir() / "metrics.json")}
    done = subprocess.run([str(ROOT / "k8s" / "kind-smoke.sh")], capture_output=True, text=True, timeout=3600, env=env)
    print(done.stdout[-8000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    assert done.stdout.rstrip().endswith("kind smoke test passed")
    assert re.search(r"^host accommodations: ", done.stdout, re.MULTILINE)
    assert re.search(r"^a pod with mnist-serve-client=allowed: reached; one without: blocked", done.stdout, re.MULTILINE)
    upgrades = re.search(r"^under load through the Service, 2 connections: (\{.*\})", done.stdout, re.MULTILINE)
    figures = json.loads(upgrades.group(1))
    assert figures["requests"] > 100 and figures["failed"] == 0 and figures["dropped"] == 0
    # Every pod after the upgrades serves registry version 2, its checksum checked.
    assert re.search(r"registry version 2, sha256 [0-9a-f]{12} checked", done.stdout)
    # The release cycle: two rollouts under load lose nothing and every answer names version 1 or 2; a version
    # that does not load is rolled back without a failed request; a canary of one pod in three gets a share.
    rollouts = json.loads(re.search(r"^rollouts under load through the Service: (\{.*\})", done.stdout, re.MULTILINE).group(1))
    assert rollouts["failed"] == rollouts["dropped"] == 0 and set(rollouts["versions"]) == {"1", "2"}
    assert re.search(r"^error: version 3 failed \(pod \S+ failed: the model does not load: .*\); rolled back: ", done.stdout, re.MULTILINE)
    rolled_back = json.loads(re.search(r"^rolled back in \d+ s; meanwhile through the Service: (\{.*\})", done.stdout, re.MULTILINE).group(1))
    assert rolled_back["failed"] == rolled_back["dropped"] == 0 and set(rolled_back["versions"]) == {"2"}
    canary = json.loads(re.search(r"^with the canary, through the Service: (\{.*\})", done.stdout, re.MULTILINE).group(1))
    assert set(canary["versions"]) == {"1", "2"} and canary["failed"] == 0
