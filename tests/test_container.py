"""The serving image, built and run for real: a Docker engine (scripts/docker-engine.sh installs and starts
one where none runs), the image built offline (docker/build.sh), and containers started as the chart runs
its pods (scripts/container.py: read-only root, uid 1000, no capabilities, tmpfs only on the emptyDirs).
Checked: readiness is an answered prediction, real digits in every input form, metrics, no management
API outside, SIGTERM, and each refusal as one line."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bench.flood import PLAN, flood, raise_open_files_limit
from handler.client import encoded, post
from handler.server import Ports

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from container import (  # noqa: E402
    LABEL,
    TEST_DIGIT_LABEL,
    ChartPod,
    Container,
    docker,
    predict,
    quantity_bytes,
    watch_start_up,
)

pytestmark = pytest.mark.slow

START_S = 300.0  # JVM, two workers importing torch, warm-up: seconds on an idle machine, minutes on a busy one
FAIL_S = 120.0  # a refusal starts no TorchServe


def build(*args: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """docker/build.sh ARGS: (the tag it built, what it said on stderr)."""
    done = subprocess.run(
        [str(ROOT / "docker" / "build.sh"), *args],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1], done.stderr


@pytest.fixture(scope="session")
def engine() -> None:
    done = subprocess.run([str(ROOT / "scripts" / "docker-engine.sh")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    leftovers = docker("ps", "--all", "--quiet", "--filter", f"label={LABEL}").stdout.split()
    if leftovers:  # from an interrupted run
        docker("rm", "--force", *leftovers, check=False)


def test_an_engine_starts_over_pid_files_a_stopped_machine_left(engine, tmp_path):
    """A machine started again from its disk (a restored VM, a CI runner) keeps /run's pid files while their
    PIDs now belong to other processes: the script still starts an engine. Run in PID, mount and network
    namespaces of its own with an empty /run and /var/lib/docker, so the machine's own engine is untouched."""
    (tmp_path / "lib").mkdir()
    inside = f"""
        set -o errexit -o nounset
        mount -t tmpfs tmpfs /run && mount --bind {tmp_path}/lib /var/lib/docker
        sleep 600 & other=$!
        mkdir -p /run/docker/containerd
        echo $other >/run/docker.pid && echo $other >/run/docker/containerd/containerd.pid
        MNIST_SERVE_CACHE={tmp_path} {ROOT}/scripts/docker-engine.sh
        tr '\\0' ' ' </proc/$(cat /run/docker.pid)/cmdline
        kill $(cat /run/docker.pid) && while [[ -e /run/docker.pid ]]; do sleep 0.2; done
    """
    done = subprocess.run(
        ["unshare", "--pid", "--mount", "--net", "--fork", "--mount-proc", "bash", "-c", inside],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr + (tmp_path / "dockerd.log").read_text()[-3000:]
    said = done.stderr.splitlines()
    assert any(
        re.fullmatch(r"docker-engine: removing /var/run/docker.pid: pid \d+ is not a running dockerd .*", line)
        for line in said
    )
    assert any(
        re.fullmatch(
            r"docker-engine: removing /var/run/docker/containerd/containerd.pid: "
            r"pid \d+ is not a running containerd .*",
            line,
        )
        for line in said
    )
    assert re.fullmatch(r"docker-engine: Docker engine \S+ answers \(started here, left running\)", said[-1])
    # With no daemon.json of the machine's, BuildKit's cache is collected (each venv change adds 5 GB to it).
    assert done.stdout.split() == ["dockerd", "--config-file", f"{tmp_path}/dockerd.json"]
    assert json.loads((tmp_path / "dockerd.json").read_text())["builder"]["gc"] == {
        "enabled": True,
        "defaultKeepStorage": "15GB",
    }


@pytest.fixture(scope="session")
def image(engine) -> str:
    tag, _ = build("cpu")
    return tag


@pytest.fixture(scope="session")
def image_with_model(image, archive) -> str:
    tag, _ = build("cpu", "--with-model", env={"MODEL_ARCHIVE": str(archive), "IMAGE": "mnist-serve-test"})
    return tag


@pytest.fixture(scope="session")
def chart(helm) -> ChartPod:
    return ChartPod.render(helm, "--set", "model.source=image")


@pytest.fixture
def started():
    """Containers a test starts, removed afterwards whatever happened."""
    containers: list[Container] = []
    yield containers
    for container in containers:
        container.remove()


def start(
    started: list,
    image: str,
    chart: ChartPod,
    *extra: str,
    host_network: bool = False,
    tmpfs_options: dict[str, str] | None = None,
    secrets: dict[str, Path] | None = None,
    **env: str,
) -> Container:
    container = Container.start(
        image,
        chart,
        *extra,
        env=env,
        host_network=Ports.free() if host_network else None,
        tmpfs_options=tmpfs_options,
        secrets=secrets,
    )
    started.append(container)
    return container


@pytest.fixture(scope="session")
def digits():
    from training.data import load_mnist

    mnist = load_mnist()
    chosen = np.random.default_rng(1).choice(len(mnist.test_images), 200, replace=False)
    return mnist.test_images[chosen], mnist.test_labels[chosen]


# --- the image -------------------------------------------------------------------------------------


def test_the_image_runs_as_uid_1000_exposes_no_management_port_and_holds_no_build_ca(image):
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == "1000:1000" and sorted(config["ExposedPorts"]) == ["8080/tcp", "8082/tcp"]
    assert not any(e.startswith(("PIP_CERT=", "REQUESTS_CA_BUNDLE=")) for e in config["Env"])
    # No installer: neither in the venv nor in the base image's Python (Debian's or the python image's).
    pips = docker(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "for p in /opt/venv/bin/python /usr/bin/python3 /usr/local/bin/python3; do "
        '[ -x $p ] && $p -m pip --version && echo "$p has pip"; done; true',
    )
    assert "has pip" not in pips.stdout, pips.stdout
    # Serving code only: the entrypoint, the handler and the registry client; the training code is the training image's.
    assert docker("run", "--rm", "--entrypoint", "ls", image, "/opt/mnist-serve").stdout.split() == [
        "docker",
        "handler",
        "registry",
    ]
    # The host's CA bundle was a build secret. The certificates it has beyond the image's own (Debian's)
    # bundle, such as a TLS-intercepting proxy's, must be in no file of the image.
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    inside = docker("run", "--rm", "--entrypoint", "cat", image, str(bundle)).stdout
    extra = certificates(bundle.read_text() if bundle.exists() else "") - certificates(inside)
    for certificate in sorted(extra):
        line = certificate.splitlines()[2]  # a line of its base64 body, as any copy of it would hold
        found = docker(
            "run",
            "--rm",
            "--entrypoint",
            "grep",
            image,
            "-rlF",
            "--exclude-dir=proc",
            "--exclude-dir=sys",
            "--exclude-dir=dev",
            "-e",
            line,
            "/",
            check=False,
            timeout=600,
        )
        assert found.stdout.strip() == "", f"the host's CA is in the image: {found.stdout}"
    assert docker("run", "--rm", "--entrypoint", "ls", image, "/run/secrets", check=False).returncode != 0


def certificates(pem: str) -> set[str]:
    return {
        block.strip() + "\n-----END CERTIFICATE-----"
        for block in pem.split("-----END CERTIFICATE-----")
        if "BEGIN" in block
    }


# --- serving, locked down ------------------------------------------------------------------------------


def test_ready_means_a_prediction_is_answered_within_a_second(image_with_model, chart, started):
    """The chart's startup probe, polled from `docker run` as the kubelet would: the first moment it passes,
    a prediction is answered within 1 s. /ping alone would say Healthy earlier (printed, not asserted)."""
    container = start(started, image_with_model, chart)
    start_up = watch_start_up(container, chart, START_S)
    print(
        f"\n/ping Healthy {start_up.ping_healthy} s, probe passed {start_up.probe_passed:.1f} s, "
        f"answer after it {start_up.answer_after_probe} s"
    )
    assert start_up.answer_after_probe is not None and start_up.answer_after_probe <= 1.0
    assert start_up.answer["digit"] == TEST_DIGIT_LABEL


def test_serves_real_digits_locked_down_and_stops_on_sigterm(image_with_model, chart, started, digits):
    container = start(started, image_with_model, chart)
    watch_start_up(container, chart, START_S)
    images, labels = digits
    url = container.url()
    forms = {
        "PNG": lambda d: (encoded(d), "image/png"),
        "JPEG": lambda d: (encoded(d, "JPEG"), "image/jpeg"),
        "base64 JSON": lambda d: (
            json.dumps({"data": base64.b64encode(encoded(d)).decode()}).encode(),
            "application/json",
        ),
        "28x28 array": lambda d: (json.dumps(d.tolist()).encode(), "application/json"),
        "784 array": lambda d: (json.dumps(d.ravel().tolist()).encode(), "application/json"),
    }
    for name, form in forms.items():
        replies = [post(url, *form(d)) for d in images[:60]]
        assert {r.status for r in replies} == {200}, name
        assert np.mean([r.answer["digit"] for r in replies] == labels[:60]) >= 0.95, name
    batch = post(url, json.dumps({"instances": [d.tolist() for d in images[:8]]}).encode(), "application/json")
    assert batch.status == 200 and len(batch.answer["predictions"]) == 8
    assert np.mean([p["digit"] for p in batch.answer["predictions"]] == labels[:8]) >= 0.75

    with urllib.request.urlopen(container.url("/metrics", 8082), timeout=10) as answer:
        assert b"ts_inference_requests_total" in answer.read()

    # The management API listens on the container's loopback only: not at its address, where 8080 answers.
    address = container.ip()
    assert reachable(address, 8080) and not reachable(address, 8081)
    assert container.exec("id", "-u").stdout.strip() == "1000"
    write = container.exec("touch", "/written")
    assert write.returncode != 0 and "Read-only file system" in write.stderr

    code, seconds = container.stop(timeout=chart.grace_seconds() + 10)
    assert code == 143, container.logs()[-2000:]
    assert seconds < chart.grace_seconds()
    assert "SIGTERM: stopping TorchServe" in container.logs()


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


# --- the model from the registry ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def published(cassandra, archive, metrics_file) -> str:
    """The reference archive published in the test keyspace under an alias of its own."""
    import secrets

    from registry.store import Registry, read_metrics

    registry = Registry(cassandra)
    version, alias = f"img-{secrets.token_hex(3)}", f"container{secrets.token_hex(3)}"
    registry.publish(archive, read_metrics(metrics_file), version)
    registry.promote(version, alias)
    return alias


def registry_env(cassandra_settings, **more: str) -> dict[str, str]:
    """The local node, reached from the container through the host's network (it listens on loopback)."""
    return {
        "MODEL_SOURCE": "registry",
        "CASSANDRA_HOSTS": "127.0.0.1",
        "CASSANDRA_PORT": str(cassandra_settings.port),
        "CASSANDRA_KEYSPACE": cassandra_settings.keyspace,
        **more,
    }


@pytest.mark.cassandra
def test_a_flood_leaves_the_locked_down_container_serving_within_its_memory_limit(image_with_model, chart, started):
    # The floods of tests/test_flood.py against the container as the chart runs it: read-only, uid 1000, and the
    # chart's memory limit (docker --memory), past which the kernel would kill it as the kubelet's cgroup does.
    container = start(started, image_with_model, chart, host_network=True)
    watch_start_up(container, chart, START_S)
    raise_open_files_limit(max(count for _, count in PLAN) + 256)
    for kind, count in PLAN:
        report = asyncio.run(flood(container.url(), kind, count, 30.0))
        print(f"\n{kind} {count}: {json.dumps(report.__dict__)}")
        assert report.real_answered_share >= 0.9 and report.answer_after_s is not None, report
        assert not {"reset", "refused", "broken"} & set(report.flood_statuses), report.flood_statuses
    state = json.loads(docker("inspect", "--format", "{{json .State}}", container.id).stdout)
    assert state["Running"] and not state["OOMKilled"] and state["Restarting"] is False, state
    # The most the container's cgroup ever held: cgroup v2's memory.peak, or v1's max_usage_in_bytes.
    read = container.exec("cat", "/sys/fs/cgroup/memory.peak", "/sys/fs/cgroup/memory/memory.max_usage_in_bytes")
    peak = int(read.stdout.split()[0])
    assert peak < quantity_bytes(chart.container["resources"]["limits"]["memory"]), peak
    print(f"peak memory {peak / 2**20:.0f} MiB of the chart's {chart.container['resources']['limits']['memory']}")
    assert "OutOfMemoryError" not in container.logs()


def test_serves_a_registry_alias_from_the_local_node(image, chart, started, published, cassandra_settings):
    container = start(
        started, image, chart, host_network=True, **registry_env(cassandra_settings, MODEL_VERSION=published)
    )
    start_up = watch_start_up(container, chart, START_S)
    assert start_up.answer_after_probe is not None
    assert f"({published}), sha256" in container.logs() and "checked" in container.logs()
    code, _ = container.stop(timeout=chart.grace_seconds() + 10)
    assert code == 143


@pytest.mark.cassandra
def test_serves_through_astras_connection_path_from_read_only_secret_mounts(
    image, helm, started, astra_local, archive, metrics_file, tmp_path
):
    """As on EKS: the bundle and a read-only token from Secrets, mounted read-only (so the driver must unpack the
    bundle under /tmp), the registry reached through the stand-in's metadata service and SNI proxy."""
    from registry import db
    from registry.settings import cassandra_settings
    from registry.store import Registry, read_metrics

    with db.connect(cassandra_settings(astra_local.env("bundle", "writer"))) as session:
        registry = Registry(session)
        if registry.find("container-1") is None:
            registry.publish(archive, read_metrics(metrics_file), "container-1")
        registry.promote("container-1", "container")
    astra_local.use_token("reader")
    secrets = {}
    for name, source, key in (
        ("bundle", astra_local.paths.bundle, "secure-connect-bundle.zip"),
        ("token", astra_local.paths.token, "token"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(source, folder / key)
        os.chown(folder / key, 0, 1000)  # as a Secret volume: root's, readable by the pod's fsGroup
        (folder / key).chmod(0o440)
        secrets[f"mnist-serve-astra-{name}"] = folder
    chart = ChartPod.render(
        helm,
        "--set",
        "astra.enabled=true",
        "--set",
        "astra.bundleSecret.name=mnist-serve-astra-bundle",
        "--set",
        "astra.tokenSecret.name=mnist-serve-astra-token",
        "--set",
        f"cassandra.keyspace={astra_local.keyspace}",
        "--set",
        "model.version=container",
    )
    container = start(started, image, chart, host_network=True, secrets=secrets)
    start_up = watch_start_up(container, chart, START_S)
    assert start_up.answer_after_probe is not None, container.logs()[-3000:]
    assert "registry version container-1 (container), sha256" in container.logs()
    for secret in astra_local.secrets():
        assert secret not in container.logs()


# --- refusals: one line, exit 1 ------------------------------------------------------------------------


def damaged_copy(archive: Path, directory: Path) -> Path:
    damaged = directory / "mnist.mar"
    damaged.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    damaged.chmod(0o644)
    return damaged


REFUSALS = {
    "unknown version": "cannot get model 'no-such-version' from the registry",
    "registry down": "cannot reach the model registry",
    "damaged archive": "is damaged, not a readable zip",
    "unwritable model store": "/home/model-server/model-store is not writable for uid 1000",
}


@pytest.mark.cassandra
@pytest.mark.parametrize("refusal", REFUSALS)
def test_each_refusal_is_one_line_and_exit_1(refusal, image, chart, started, archive, cassandra_settings, tmp_path):
    if refusal == "unknown version":
        container = start(
            started,
            image,
            chart,
            host_network=True,
            **registry_env(cassandra_settings, MODEL_VERSION="no-such-version"),
        )
    elif refusal == "registry down":
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        container = start(
            started,
            image,
            chart,
            host_network=True,
            **{**registry_env(cassandra_settings), "CASSANDRA_PORT": str(port), "CASSANDRA_CONNECT_TIMEOUT": "2"},
        )
    elif refusal == "damaged archive":
        container = start(
            started,
            image,
            chart,
            "-v",
            f"{damaged_copy(archive, tmp_path)}:/opt/mnist-serve/model/mnist.mar:ro",
            MODEL_SOURCE="image",
        )
    else:  # a plain `docker run --tmpfs PATH`: root's, 0755
        container = start(
            started,
            image,
            chart,
            "-v",
            f"{archive}:/opt/mnist-serve/model/mnist.mar:ro",
            MODEL_SOURCE="image",
            tmpfs_options={"/home/model-server/model-store": "mode=755"},
        )
    assert container.wait(FAIL_S) == 1
    output = container.logs()
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("entrypoint: error: ") and REFUSALS[refusal] in errors[0], output
    assert "Traceback" not in output and "TorchServe started" not in output


# --- the other targets -----------------------------------------------------------------------------------


def test_the_gpu_image_builds_here_and_serves_on_a_cpu(engine, image, archive, helm, started):
    """nvidia/cuda cannot be pulled here: the build says it skipped the forward-compatibility libraries.
    On a node without a GPU, with the GPU values' NUMBER_OF_GPU=1, it serves and says it runs on the CPU."""
    tag, said = build("gpu")
    assert "skipped the CUDA driver forward-compatibility libraries" in said and "driver >= 580" in said
    gpu_chart = ChartPod.render(
        helm, "-f", str(ROOT / "charts" / "mnist-serve" / "values-eks-gpu.yaml"), "--set", "model.source=image"
    )
    assert gpu_chart.env()["NUMBER_OF_GPU"] == "1"
    container = start(
        started, tag, gpu_chart, "-v", f"{archive}:/opt/mnist-serve/model/mnist.mar:ro", MODEL_SOURCE="image"
    )
    start_up = watch_start_up(container, gpu_chart, START_S)
    assert start_up.answer_after_probe is not None
    assert "entrypoint: ready: POST http://<pod>:8080/predictions/mnist (model on cpu)" in container.logs()


def test_the_training_image_builds_and_runs_its_cli_locked_down(engine, image, chart):
    tag, _ = build("gpu", "--train")
    done = docker(
        "run",
        "--rm",
        "--read-only",
        "--user",
        "1000:1000",
        "--cap-drop=ALL",
        "--tmpfs",
        "/tmp",
        tag,
        "--help",
        check=False,
    )
    assert done.returncode == 0 and "train" in done.stdout, done.stdout + done.stderr
    assert docker("image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip() == "1000:1000"
    # It publishes what it trains: the registry's command line runs in it too.
    published = docker(
        "run",
        "--rm",
        "--read-only",
        "--user",
        "1000:1000",
        "--entrypoint",
        "/opt/venv/bin/python",
        tag,
        "-m",
        "registry.cli",
        "publish",
        "--help",
    )
    assert "--metrics" in published.stdout


def test_a_build_removes_the_images_it_supersedes_and_no_one_elses(engine, image):
    """Each image a build replaces under its tag is left untagged (5 GB when the venv changed): build.sh
    removes this project's (its title label), never an untagged image of someone else's."""

    def untagged(title: str) -> str:
        """Two images with no layers built under one tag: the first's id, left untagged."""
        tag, built = f"mnist-serve-superseded-{title}:test", []
        for revision in ("old", "new"):
            done = subprocess.run(
                [
                    "docker",
                    "build",
                    "--quiet",
                    "--tag",
                    tag,
                    "--label",
                    f"revision={revision}",
                    "--label",
                    f"org.opencontainers.image.title={title}",
                    "-",
                ],
                input="FROM scratch\nLABEL superseded=yes\n",
                capture_output=True,
                text=True,
                env={**os.environ, "DOCKER_BUILDKIT": "0"},
            )
            assert done.returncode == 0, done.stderr
            built.append(done.stdout.strip())
        docker("image", "rm", tag)
        return built[0]

    ours, theirs = untagged("mnist-serve"), untagged("someone-else")
    _, said = build("cpu")
    assert re.search(r"^build\.sh: superseded mnist-serve images removed: \S+ freed$", said, re.MULTILINE), said

    def exists(image_id):
        return docker("image", "inspect", image_id, check=False).returncode == 0

    assert not exists(ours) and exists(theirs)
    docker("image", "rm", theirs)


def test_the_docs_docker_run_line_works_as_written(image_with_model, archive):
    """Only the image (the test's own build of it) and the host port (a free one, on loopback) are replaced."""
    page = (ROOT / "docs" / "container-image.md").read_text()
    block = re.search(r"```bash\n(docker run --rm --read-only.*?)```", page, re.DOTALL)
    command = " ".join(block.group(1).replace("\\\n", " ").split())
    assert " mnist-serve:0.1.0-cpu-model" in command and " -p 8080:8080 " in command
    port = Ports.free().inference
    command = command.replace(" mnist-serve:0.1.0-cpu-model", f" {image_with_model}").replace(
        " -p 8080:8080 ", f" -p 127.0.0.1:{port}:8080 "
    )
    process = subprocess.Popen(
        ["bash", "-c", f"exec {command}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + START_S
        while (reply := answered(f"http://127.0.0.1:{port}/predictions/mnist")) is None and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.5)
        assert reply is not None and reply["digit"] == TEST_DIGIT_LABEL
        process.send_signal(signal.SIGTERM)  # the docker client passes it on to the container
        assert process.wait(60) == 143
    finally:
        if process.poll() is None:
            process.kill()
        leftovers = docker("ps", "--quiet", "--filter", f"ancestor={image_with_model}").stdout.split()
        if leftovers:
            docker("rm", "--force", *leftovers, check=False)


def answered(url: str) -> dict | None:
    status, answer = predict(url, timeout=5)
    return answer if status == 200 else None
