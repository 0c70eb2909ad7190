"""The chart on a real kind cluster (k8s/kind-smoke.sh, make kind-smoke): the node image built from package
registries where kind's own cannot be pulled, the serving image preloaded into it, helm install and test, digits
in every input form, uid and read-only root filesystem, the NetworkPolicy enforced, the registry path,
zero-downtime upgrades and a killed container under load, bad values and an unreachable registry, each read from
the JSON summary the script writes (its phases and their figures), not from what it prints for people. Plus the
pieces that can be checked alone: the docker wrapper kind uses where nodes cannot run privileged, the one-line
refusal and the summary of a run that stops, and the preloaded node image."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reference_model import reference_model_dir

ROOT = Path(__file__).resolve().parents[1]
UNPRIVILEGED = ROOT / "k8s" / "kind" / "unprivileged"


def no_engine(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """The smoke test where no Docker engine answers: it stops in its first phase."""
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
        "KIND_SMOKE_OUT": str(tmp_path / "out"),
        **env,
    }
    return subprocess.run([str(ROOT / "k8s" / "kind-smoke.sh")], capture_output=True, text=True, timeout=60, env=env)


def test_a_docker_engine_that_does_not_answer_is_one_line_within_seconds(tmp_path):
    done = no_engine(tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: no Docker engine answers at DOCKER_HOST=unix://{tmp_path}/no-engine.sock ('docker info' fails)"
    ]


def test_a_run_that_stops_names_its_failed_phase_in_the_summary_in_the_output_folder(tmp_path):
    done = no_engine(tmp_path)
    assert done.returncode == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["outcome"] == "failed" and summary["failed_phase"] == "preflight"
    assert "docker-engine.sh" in summary["error"]
    first, *rest = summary["phases"]
    assert first["name"] == "preflight" and first["outcome"] == "failed" and first["seconds"] < 60
    assert rest and all(phase["outcome"] == "not run" for phase in rest)
    assert "teardown" in [phase["name"] for phase in rest]


def test_the_summary_goes_where_kind_smoke_summary_says(tmp_path):
    done = no_engine(tmp_path, KIND_SMOKE_SUMMARY=str(tmp_path / "elsewhere" / "smoke.json"))
    assert done.returncode == 1
    assert json.loads((tmp_path / "elsewhere" / "smoke.json").read_text())["failed_phase"] == "preflight"
    assert not (tmp_path / "out" / "summary.json").exists()


def wrapped(tmp_path: Path, *arguments: str) -> list[str]:
    """What the wrapper hands the docker after it on PATH (here one that prints its arguments as JSON)."""
    real = tmp_path / "bin" / "docker"
    real.parent.mkdir()
    real.write_text("#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    real.chmod(0o755)
    env = {**os.environ, "PATH": f"{UNPRIVILEGED}:{real.parent}:{os.environ['PATH']}"}
    done = subprocess.run(["docker", *arguments], capture_output=True, text=True, env=env, timeout=30, check=True)
    return json.loads(done.stdout)


def test_the_wrapper_turns_a_privileged_run_into_explicit_capabilities(tmp_path):
    got = wrapped(tmp_path, "run", "--name", "node", "--privileged", "--volume", "/var", "kindest/node:v1")
    assert "--privileged" not in got
    assert got[:3] == ["run", "--name", "node"] and got[-3:] == ["--volume", "/var", "kindest/node:v1"]
    assert {
        "--cap-add=ALL",
        "--cap-drop=SYS_RESOURCE",
        "--security-opt=systempaths=unconfined",
        "--device=/dev/kmsg",
    } <= set(got)


def test_the_wrapper_drops_privileged_from_exec_and_passes_the_rest_unchanged(tmp_path):
    got = wrapped(tmp_path, "exec", "--privileged", "-i", "node", "ctr", "images", "import", "-")
    assert got == ["exec", "-i", "node", "ctr", "images", "import", "-"]


def test_the_wrapper_leaves_other_commands_alone(tmp_path):
    assert wrapped(tmp_path, "inspect", "--format", "{{.Id}}", "node") == ["inspect", "--format", "{{.Id}}", "node"]


def mounted_below(directory: Path) -> list[str]:
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return [point for point in points if point.startswith(f"{directory}/")]


def test_what_a_killed_node_image_build_left_mounted_is_unmounted_so_the_next_build_can_start_over(tmp_path):
    """debootstrap mounts /proc in the node's root filesystem; killed, it leaves it there, and the next build
    could not delete the directory: rm cannot remove a file below a mounted /proc, and says so for each one."""
    rootfs = tmp_path / "kind-node" / "rootfs"
    (rootfs / "proc").mkdir(parents=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True)
    (rootfs / "dev" / "shm").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(rootfs / "dev" / "shm")], check=True)
    try:
        assert mounted_below(tmp_path) == [str(rootfs / "proc"), str(rootfs / "dev" / "shm")]
        done = subprocess.run(
            [
                "bash",
                "-c",
                'source "$1" && unmount_below "$2"',
                "bash",
                str(ROOT / "k8s" / "kind" / "node-image.sh"),
                str(tmp_path / "kind-node"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert mounted_below(tmp_path) == []
    finally:
        for path in reversed(mounted_below(tmp_path)):
            subprocess.run(["umount", "--lazy", path])


@pytest.mark.slow
def test_a_preloaded_node_image_holds_the_serving_image_is_built_once_and_replaces_the_last_build(tmp_path):
    """k8s/kind/preload.sh on the smoke test's node image with one-file images in place of the serving and the
    training image."""
    subprocess.run([str(ROOT / "scripts" / "docker-engine.sh")], check=True)
    node = subprocess.run(
        [str(ROOT / "k8s" / "kind" / "node-image.sh")], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    serving, training = "mnist-serve-preload-test:1", "mnist-serve-preload-test:1-train"

    def build_serving(content: str, image: str = serving) -> None:
        (tmp_path / "file").write_text(content)
        done = subprocess.run(
            f"tar -C {tmp_path} -c file | docker import - {image}",
            shell=True,
            check=True,
            capture_output=True,
            text=True,
        )
        built.append(done.stdout.strip())

    def preload() -> tuple[str, str]:
        done = subprocess.run(
            [str(ROOT / "k8s" / "kind" / "preload.sh"), node, serving, training], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[-1], done.stderr

    def inspect(image: str, field: str) -> str:
        return subprocess.run(
            ["docker", "image", "inspect", "--format", f"{{{{json {field}}}}}", image], capture_output=True, text=True
        ).stdout.strip()

    container = f"mnist-serve-preload-test-{os.getpid()}"
    built = []
    try:
        build_serving("training", training)
        build_serving("first")
        first, said = preload()
        built.append(first)
        assert re.search(r"^preload: built \S+ in \d+ s$", said, re.MULTILINE), said
        assert inspect(first, ".Config.Entrypoint") == inspect(node, ".Config.Entrypoint") != "null"
        # What the cluster's node will find in its containerd: this image beside the control plane's.
        subprocess.run(
            ["docker", "run", "--detach", "--name", container, "--tmpfs", "/run", "--entrypoint", "containerd", first],
            check=True,
            capture_output=True,
        )
        held = ""
        for _ in range(60):
            done = subprocess.run(
                ["docker", "exec", container, "ctr", "--namespace", "k8s.io", "images", "ls", "--quiet"],
                capture_output=True,
                text=True,
            )
            if done.returncode == 0:
                held = done.stdout
                break
            time.sleep(0.5)
        assert f"docker.io/library/{serving}\n" in held and "kube-apiserver:" in held, held
        assert f"docker.io/library/{training}\n" in held, held
        subprocess.run(["docker", "rm", "--force", container], check=True, capture_output=True)

        again, said = preload()
        assert again == first and "is there" in said

        build_serving("second")
        second, said = preload()
        built.append(second)
        assert second != first and "built" in said
        gone = subprocess.run(["docker", "image", "inspect", first], capture_output=True).returncode != 0
        assert gone, "the last build's preloaded image stayed"
    finally:
        subprocess.run(["docker", "rm", "--force", container], capture_output=True)
        subprocess.run(["docker", "image", "rm", "--force", *built], capture_output=True)


@pytest.mark.slow
def test_kind_smoke_test_passes(archive, tmp_path):
    """The whole smoke test on the tests' archive (the reference model), judged by its JSON summary; what it
    printed is shown with -s."""
    summary_file = tmp_path / "summary.json"
    env = {
        **os.environ,
        "MODEL_ARCHIVE": str(archive),
        "MODEL_METRICS": str(reference_model_dir() / "metrics.json"),
        "KIND_SMOKE_OUT": str(tmp_path),
        "KIND_SMOKE_SUMMARY": str(summary_file),
    }
    done = subprocess.run([str(ROOT / "k8s" / "kind-smoke.sh")], capture_output=True, text=True, timeout=3600, env=env)
    print(done.stdout[-8000:])
    assert summary_file.is_file(), f"no summary (exit {done.returncode}): " + done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    outcomes = {phase["name"]: phase["outcome"] for phase in summary["phases"]}
    assert (done.returncode, summary["outcome"]) == (0, "passed"), (
        f"failed in {summary['failed_phase']}: {summary['error']}\n" + done.stdout[-4000:] + done.stderr[-4000:]
    )
    assert set(outcomes.values()) == {"passed"}, outcomes
    figures = {phase["name"]: phase["figures"] for phase in summary["phases"]}

    assert isinstance(figures["host_accommodations"]["host_accommodations"], list)
    # Every form of 20 test digits answered, at most one read wrong a form.
    digits = figures["digits"]["digits"]
    assert len(digits["forms"]) == 6 and digits["asked"] == 120
    assert all(form["asked"] == form["answered"] == 20 and form["right"] >= 19 for form in digits["forms"].values()), (
        digits
    )
    malformed = figures["malformed_bodies"]["malformed_bodies"]
    assert malformed["refused_with_a_reason"] == malformed["malformed"] == 4 and malformed["digit_after"]
    assert all(400 <= status < 500 for status in malformed["statuses"].values()), malformed
    # The floods through the Service (bench/flood.py in a pod): every one turned away or answered, the real digits
    # beside them answered, a digit answered again after each, and no serving container restarted.
    floods = figures["flood"]["floods"]
    assert [(f["flood"], f["count"]) for f in floods] == [("uploads", 300), ("uploads", 1000), ("slow", 200)], floods
    for flood in floods:
        assert flood["real_answered_share"] >= 0.9 and flood["answer_after_s"] is not None, flood
        assert not {"reset", "refused", "broken", "held"} & set(flood["flood_statuses"]), flood
    assert figures["flood"]["restarts_during_floods"] == 0
    assert figures["serving_container"]["uid"] == 1000
    assert "Read-only file system" in figures["serving_container"]["touch_root"]
    policy = figures["network_policy"]
    assert policy["allowed"] == "reached" and policy["outside"].startswith("blocked"), policy

    # Zero downtime through three upgrades; every serving pod after them fetched registry version 2, checked.
    upgrades = figures["upgrades_under_load"]
    assert upgrades["load"]["requests"] > 100 and lost(upgrades["load"]) == 0, upgrades
    models = upgrades["serving_pods_model"]
    assert len(models) >= 2, upgrades
    assert all(re.fullmatch(r"registry version 2, sha256 [0-9a-f]{12} checked", model) for model in models), upgrades

    # The release cycle: the rollout account may patch the Deployment and the serving pods' may not; two rollouts
    # under load lose nothing and every answer names version 1 or 2; a version that does not load is rolled back
    # without a failed request; a canary of one pod in three gets a share, and after its abort only 2 serves.
    account = figures["rollout_account"]
    assert account["rollout_account_may_patch"] is True and account["serving_account_may_patch"] is False
    rollouts = figures["rollouts_under_load"]
    assert lost(rollouts["load"]) == 0 and set(rollouts["load"]["versions"]) == {"1", "2"}, rollouts
    assert rollouts["pinned_version"] == 2
    failed = figures["failed_rollout"]
    assert re.match(
        r"error: version 3 failed \(pod \S+ failed: the model does not load: .*\); rolled back: ", failed["refusal"]
    ), failed
    assert lost(failed["load"]) == 0 and set(failed["load"]["versions"]) == {"2"}, failed
    assert failed["pinned_version"] == failed["production_version"] == 2
    canary = figures["canary"]
    assert set(canary["load"]["versions"]) == {"1", "2"} and canary["load"]["failed"] == 0, canary
    assert canary["versions_after_abort"] == ["2", "2"]

    # Training on the cluster: the 2-rank Job published one version that records its run, rolled out under load
    # without a loss (answers from 2, then from it); a run whose rank 1 is killed fails and publishes nothing.
    published = figures["cluster_training"]["published"]
    assert published["run"] == {
        "world_size": 2,
        "job": "mnist-train",
        "image": figures["training_image"]["training_image"],
    }, published
    assert published["epochs"] == 1 and published["test_accuracy"] > 0.9, published
    trained = figures["trained_rollout"]
    assert lost(trained["load"]) == 0 and set(trained["load"]["versions"]) == {"2", published["version"]}, trained
    assert str(trained["pinned_version"]) == published["version"]
    killed_rank = figures["killed_rank"]
    assert killed_rank["train_cluster_exit"] == 1 and killed_rank["job_failed_reason"] == "PodFailurePolicy"
    assert re.search(r"rank : 1 \(local_rank: 0\) exitcode : -9", killed_rank["rank_1_report"]), killed_rank
    assert killed_rank["published_versions"] == 0

    killed = figures["killed_container"]
    assert killed["restarts_after"] == killed["restarts_before"] + 1 and killed["ready_again_s"] < 300, killed
    assert killed["load"]["answered"] > 0, killed
    assert "/model/source" in figures["bad_values"]["refusal"]
    assert "cannot reach the model registry" in figures["unreachable_registry"]["termination_message"]


def lost(load: dict) -> int:
    """Requests of a run of k8s/kind/load.py that failed or got no answer."""
    return load["failed"] + load["dropped"]


@pytest.mark.parametrize(
    ("after", "flags", "exit_code", "said"),
    [
        (["1", "2", "4"], [], 0, '"version": "4"'),
        (["1", "2", "4", "5"], [], 1, "expected one new version, found: 4, 5"),
        (["1", "2"], [], 1, "expected one new version, found: none"),
        (["1", "2"], ["--none"], 0, ""),
        (["1", "2", "4"], ["--none"], 1, "expected no new version, found: 4"),
    ],
)
def test_new_version_tells_what_a_training_run_published(tmp_path, after, flags, exit_code, said):
    """k8s/kind/new_version.py, the smoke test's judge of what a training Job added to the registry."""
    for name, versions in (("before", ["1", "2"]), ("after", after)):
        (tmp_path / f"{name}.json").write_text(json.dumps([{"version": v, "run": {"world_size": 2}} for v in versions]))
    done = subprocess.run(
        [sys.executable, str(ROOT / "k8s" / "kind" / "new_version.py"), "before.json", "after.json", *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == exit_code and said in done.stdout + done.stderr, done
