"""docker/entrypoint.py run for real, with the image's Python environment (docker/install.sh): the model from
the registry on the local Cassandra node or from the image, a real TorchServe, stop signals, and each way it
refuses to start (unknown version, registry down, damaged archive, bad settings) with its message where
Kubernetes shows it (the termination log)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import secrets
import signal
import socket
import stat
import subprocess
import time
import zipfile
from pathlib import Path

import psutil
import pytest
from conftest import LOCAL_ENV
from entrypoint_pod import ENTRYPOINT, READY_S, TEST_DIGIT, TEST_DIGIT_LABEL, Pod, Running, post_digit
from image_env import ROOT

from handler.archive import build_archive
from handler.server import LOG_CONFIG, Ports, config_with_ports

pytestmark = pytest.mark.slow

FAIL_S = 60.0  # a refusal is quick: no TorchServe is started


def run(python: Path, pod: Pod, timeout: float = FAIL_S, **settings: str) -> tuple[int, str]:
    running = Running(python, pod, **settings)
    return running.finish(timeout), running.output


def ipv4(address: str) -> str:
    """The JVM listens on IPv6 sockets that also take IPv4: ::ffff:127.0.0.1 is 127.0.0.1."""
    parsed = ipaddress.ip_address(address)
    return str(getattr(parsed, "ipv4_mapped", None) or parsed)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- serving -------------------------------------------------------------------------------------------


@pytest.mark.cassandra
@pytest.mark.serve
def test_serves_a_registry_alias_and_stops_cleanly_on_sigterm(
    python, pod, archive, cassandra, cassandra_settings, metrics_file
):
    from registry.store import Registry, read_metrics

    registry = Registry(cassandra)
    version, alias = f"ep-{secrets.token_hex(3)}", f"serving{secrets.token_hex(3)}"
    registry.publish(archive, read_metrics(metrics_file), version)
    registry.promote(version, alias)

    running = Running(
        python, pod, MODEL_SOURCE="registry", MODEL_VERSION=alias, CASSANDRA_KEYSPACE=cassandra_settings.keyspace
    )
    try:
        running.wait_for("entrypoint: ready", READY_S)
        assert (pod.path("tmp") / "mnist-serve-ready").exists()  # the chart's startup probe checks it
        assert f"registry version {version} ({alias})" in running.output
        assert sha256(pod.path("store") / "mnist.mar") == sha256(archive)  # the published bytes, checksum-verified
        answer = post_digit(pod.ports.inference)
        assert answer["digit"] == TEST_DIGIT_LABEL, answer
        assert answer["model"] == {
            "version": version,
            "sha256": sha256(archive)[:12],
        }  # the registry's version, not the archive's own

        # TorchServe runs as the entrypoint's child (the JVM itself, not the launcher), its workers under it, and
        # nginx in front of it, the entrypoint's other child.
        children = psutil.Process(running.process.pid).children()
        assert sorted(child.name() for child in children) == ["java", "nginx"], children
        (java,) = [child for child in children if child.name() == "java"]
        (nginx,) = [child for child in children if child.name() == "nginx"]
        # Its children are the two workers and, every minute, TorchServe's system-metrics collector.
        workers = set(java.children()) & set(running.seen.ran("model_service_worker"))
        assert java.name() == "java" and len(workers) == 2, [running.seen.command(child) for child in java.children()]
        listening = {
            c.laddr.port: ipv4(c.laddr.ip) for c in java.net_connections("tcp") if c.status == psutil.CONN_LISTEN
        }
        assert listening[pod.ports.management] == "127.0.0.1"  # the management API never leaves the pod
        # TorchServe's inference API: only through nginx, over a Unix socket in a directory only this user can
        # enter; no TCP port, and nothing but Prometheus' metrics beyond loopback.
        assert pod.ports.inference not in listening
        assert all(ip == "127.0.0.1" for port, ip in listening.items() if port != pod.ports.metrics), listening
        backend = pod.path("tmp") / "backend" / "inference.sock"
        assert str(backend) in {c.laddr for c in java.net_connections("unix")}
        assert stat.S_IMODE(backend.parent.stat().st_mode) == 0o700
        in_front = {
            c.laddr.port: ipv4(c.laddr.ip) for c in nginx.net_connections("tcp") if c.status == psutil.CONN_LISTEN
        }
        assert in_front[pod.ports.inference] in ("0.0.0.0", "::")  # every address: Kubernetes routes to the pod IP
    finally:
        running.process.send_signal(signal.SIGTERM)
        code = running.finish(60)

    assert code == 128 + signal.SIGTERM, running.output[-3000:]  # the JVM's own exit code, passed on
    assert "SIGTERM: stopping TorchServe" in running.output and "TorchServe exited with code 143" in running.output
    gone, alive = psutil.wait_procs(running.processes(), timeout=10)
    assert not alive, f"left running: {[running.seen.command(process) for process in alive]}"
    assert pod.termination_message == ""  # a requested stop is no failure
    assert not (pod.path("tmp") / "mnist-serve-ready").exists()
    # Writes go only to the emptyDir paths: the working directory and HOME stay empty.
    assert not list(pod.path("cwd").iterdir()) and not list(pod.path("home").iterdir())
    assert (pod.path("logs") / "ts_log.log").exists() and (pod.path("tmp") / "config.properties").exists()


@pytest.mark.serve
def test_serves_the_archive_built_into_the_image_and_stops_on_sigint(python, pod, archive):
    running = Running(python, pod, MODEL_SOURCE="image", MODEL_ARCHIVE=str(archive), NUMBER_OF_GPU="1")
    try:
        running.wait_for("entrypoint: ready", READY_S)
        assert post_digit(pod.ports.inference)["digit"] == TEST_DIGIT_LABEL
        # What `helm test` runs in the cluster, run here against the same kind of server.
        helm_test = subprocess.run(
            [str(python), str(ROOT / "charts" / "mnist-serve" / "files" / "helm-test.py")],
            capture_output=True,
            text=True,
            timeout=120,
            env={
                "PREDICT_URL": f"http://127.0.0.1:{pod.ports.inference}/predictions/mnist",
                "DIGIT_FILE": str(TEST_DIGIT),
                "EXPECTED_DIGIT": str(TEST_DIGIT_LABEL),
            },
        )
        assert helm_test.returncode == 0 and helm_test.stdout.startswith("ok: "), helm_test.stdout + helm_test.stderr
        # number_of_gpu is a cap: with no GPU here TorchServe uses the CPU.
        assert "number_of_gpu=1" in (pod.path("tmp") / "config.properties").read_text()
        # Nothing per batch in the logs by default (mnist_handler.quiet_batch_logs), while the
        # worker's own lines still arrive there.
        model_log = (pod.path("logs") / "model_log.log").read_text()
        assert "loaded " in model_log and "Backend received inference" not in model_log
        assert "[METRICS]HandlerTime" not in (pod.path("logs") / "ts_log.log").read_text()
    finally:
        running.process.send_signal(signal.SIGINT)
        code = running.finish(60)
    assert code == 128 + signal.SIGINT, running.output[-3000:]


def test_the_java_command_is_what_torchserve_launcher_runs(python, tmp_path):
    """The entrypoint starts the JVM itself (the launcher forwards no signals and drops the exit code); this
    keeps its command equal to the one `torchserve --start --foreground` builds, through TorchServe upgrades."""
    java_home = tmp_path / "jdk"
    (java_home / "bin").mkdir(parents=True)
    argv_file = tmp_path / "argv"
    fake_java = java_home / "bin" / "java"
    fake_java.write_text(f'#!/bin/sh\nfor arg in "$@"; do echo "$arg"; done > {argv_file}\n')
    fake_java.chmod(0o755)
    store, scratch, config = tmp_path / "store", tmp_path / "tmp", tmp_path / "config.properties"
    store.mkdir()
    scratch.mkdir()
    config.write_text(config_with_ports(Ports.free()))
    environment = {
        **LOCAL_ENV,
        "JAVA_HOME": str(java_home),
        "TEMP": str(scratch),
        "TMPDIR": str(scratch),
        "MODEL_STORE": str(store),
        "TORCHSERVE_CONFIG": str(config),
    }

    launcher = subprocess.run(
        [
            str(python.with_name("torchserve")),
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(config),
            "--log-config",
            str(LOG_CONFIG),
            "--model-store",
            str(store),
            "--models",
            "mnist=mnist.mar",
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert launcher.returncode == 0, launcher.stderr
    by_launcher = [str(java_home / "bin" / "java")] + argv_file.read_text().splitlines()

    ours = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util, json, os, sys\n"
            f"spec = importlib.util.spec_from_file_location('entrypoint', {str(ENTRYPOINT)!r})\n"
            "entrypoint = sys.modules['entrypoint'] = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(entrypoint)\n"
            "from startup.run_config import run_config  # importable once the entrypoint set the path\n"
            "settings = entrypoint.settings_from(os.environ)\n"
            "text, props = run_config(settings)\n"
            "print(json.dumps(entrypoint.java_command(props, settings.config, settings)))",
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout) == by_launcher


# --- refusing to start -------------------------------------------------------------------------------


def assert_refused(code: int, output: str, pod: Pod, message: str) -> None:
    assert code == 1, output[-3000:]
    assert message in pod.termination_message, pod.termination_message
    assert f"entrypoint: error: {pod.termination_message[:60]}" in output  # the same message in the logs
    assert "TorchServe started" not in output


@pytest.mark.cassandra
def test_an_unknown_version_is_refused(python, pod, cassandra_env):
    code, output = run(
        python,
        pod,
        MODEL_SOURCE="registry",
        MODEL_VERSION="no-such-version",
        CASSANDRA_KEYSPACE=cassandra_env["CASSANDRA_KEYSPACE"],
    )
    assert_refused(code, output, pod, "cannot get model 'no-such-version' from the registry")
    assert "no version or alias 'no-such-version'" in pod.termination_message


@pytest.mark.cassandra
def test_serving_changes_no_schema_so_a_read_only_role_can_serve(python, pod, cassandra, cassandra_settings):
    """Pods read the registry: a keyspace that is not there is reported, not created (nor its tables)."""
    missing = f"{cassandra_settings.keyspace}_absent"
    code, output = run(python, pod, MODEL_SOURCE="registry", CASSANDRA_KEYSPACE=missing)
    assert_refused(code, output, pod, f"cannot reach the model registry: keyspace {missing} does not exist")
    cassandra.cluster.refresh_schema_metadata()
    assert missing not in cassandra.cluster.metadata.keyspaces


def test_a_registry_that_is_down_is_reported(python, pod):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    code, output = run(
        python,
        pod,
        MODEL_SOURCE="registry",
        CASSANDRA_HOSTS="127.0.0.1",
        CASSANDRA_PORT=str(port),
        CASSANDRA_CONNECT_TIMEOUT="2",
    )
    assert_refused(code, output, pod, "cannot reach the model registry")
    assert f"127.0.0.1:{port}" in pod.termination_message
    assert time.monotonic() - started < 30


@pytest.mark.cassandra
def test_an_archive_altered_in_the_registry_is_refused(python, pod, archive, cassandra, cassandra_env, metrics_file):
    from registry.store import Registry, read_metrics

    registry = Registry(cassandra)
    version = f"ep-bad-{secrets.token_hex(3)}"
    published = registry.publish(archive, read_metrics(metrics_file), version)
    cassandra.execute(
        "UPDATE archive_chunks SET data = %s WHERE version = %s AND upload = %s AND chunk = 0",
        (b"not the archive", version, published.upload),
    )
    code, output = run(
        python,
        pod,
        MODEL_SOURCE="registry",
        MODEL_VERSION=version,
        CASSANDRA_KEYSPACE=cassandra_env["CASSANDRA_KEYSPACE"],
    )
    assert_refused(code, output, pod, "does not match its sha256")
    assert not (pod.path("store") / "mnist.mar").exists()


def flip_byte_inside(archive: Path, member: str) -> bytes:
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as mar:
        info = mar.getinfo(member)
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated", "is damaged"),
        ("flipped byte", "is damaged"),
        ("not a zip", "is damaged"),
        ("no manifest", "has no MAR-INF/MANIFEST.json"),
        ("no model file", "lacks model.pt, the model file its manifest names"),
    ],
)
def test_a_damaged_archive_in_the_image_is_refused(python, pod, archive, tmp_path, damage, message):
    damaged = tmp_path / "mnist.mar"
    if damage == "truncated":
        damaged.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    elif damage == "flipped byte":
        damaged.write_bytes(flip_byte_inside(archive, "model.pt"))
    elif damage == "not a zip":
        damaged.write_text("<html>404</html>")
    else:
        with zipfile.ZipFile(archive) as source, zipfile.ZipFile(damaged, "w") as target:
            for info in source.infolist():
                if info.filename != ("MAR-INF/MANIFEST.json" if damage == "no manifest" else "model.pt"):
                    target.writestr(info, source.read(info))
    code, output = run(python, pod, MODEL_SOURCE="image", MODEL_ARCHIVE=str(damaged))
    assert_refused(code, output, pod, f"model archive {pod.path('store') / 'mnist.mar'} {message}")


def test_an_image_without_a_model_says_how_to_build_one(python, pod, tmp_path):
    code, output = run(python, pod, MODEL_SOURCE="image", MODEL_ARCHIVE=str(tmp_path / "nothing.mar"))
    assert_refused(code, output, pod, "this image was built without a model")


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"MODEL_SOURCE": "s3"}, "MODEL_SOURCE='s3' is not one of registry, image"),
        ({"MODEL_VERSION": "../../etc/passwd"}, "is not a version or alias name"),
        ({"NUMBER_OF_GPU": "-1"}, "NUMBER_OF_GPU='-1' is not a whole number >= 0"),
        ({"READY_TIMEOUT": "soon"}, "READY_TIMEOUT='soon' is not a number"),
        (
            {"TORCHSERVE_CONFIG": "/nonexistent/config.properties"},
            "TORCHSERVE_CONFIG=/nonexistent/config.properties: cannot read it",
        ),
    ],
)
def test_bad_settings_are_refused(python, pod, archive, setting, message):
    code, output = run(python, pod, **{"MODEL_SOURCE": "image", "MODEL_ARCHIVE": str(archive), **setting})
    assert_refused(code, output, pod, message)


def test_a_management_api_off_loopback_is_refused(python, pod, archive, tmp_path):
    config = tmp_path / "open.properties"
    config.write_text(
        Path(pod.environment["TORCHSERVE_CONFIG"])
        .read_text()
        .replace("management_address=http://127.0.0.1:", "management_address=http://0.0.0.0:")
    )
    code, output = run(python, pod, MODEL_SOURCE="image", MODEL_ARCHIVE=str(archive), TORCHSERVE_CONFIG=str(config))
    assert_refused(code, output, pod, "must listen on 127.0.0.1 only")


@pytest.mark.serve
def test_a_model_that_never_loads_is_given_up_after_three_failed_workers(python, pod, tmp_path):
    """A valid archive whose model.pt is not a model: TorchServe starts and restarts its workers forever; the
    entrypoint gives up after three failed loads, long before READY_TIMEOUT, stops TorchServe and says why
    (a rollout then sees the pod fail at once instead of waiting out its deadline)."""
    junk = tmp_path / "model.pt"
    with zipfile.ZipFile(junk, "w") as model:
        model.writestr("model/data.pkl", b"not a TorchScript model")
    broken = build_archive(junk, tmp_path / "broken", "0.0")
    running = Running(python, pod, MODEL_SOURCE="image", MODEL_ARCHIVE=str(broken))  # READY_TIMEOUT=240
    running.wait_for("TorchServe started", FAIL_S)
    started = time.monotonic()
    code = running.finish(200)
    assert code == 1, running.output[-3000:]
    assert time.monotonic() - started < int(pod.environment["READY_TIMEOUT"])  # given up, not timed out
    assert re.match(r"the model does not load: [3-9] workers failed to load mnist\.mar: \S", pod.termination_message), (
        pod.termination_message
    )
    assert running.seen.ran("org.pytorch.serve.ModelServer") and running.seen.ran("model_service_worker")
    _, alive = psutil.wait_procs(running.processes(), timeout=10)
    assert not alive, [running.seen.command(process) for process in alive]


def test_a_stop_signal_while_fetching_the_model_ends_at_once(python, pod):
    """SIGTERM before TorchServe runs (here: a registry that accepts connections and never answers)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        running = Running(
            python,
            pod,
            MODEL_SOURCE="registry",
            CASSANDRA_HOSTS="127.0.0.1",
            CASSANDRA_PORT=str(silent.getsockname()[1]),
            CASSANDRA_CONNECT_TIMEOUT="120",
        )
        running.wait_for("getting model production from the registry", FAIL_S)
        time.sleep(1)
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        code = running.finish(30)
    assert code == 128 + signal.SIGTERM, running.output
    assert "stopped before TorchServe started" in running.output
    assert time.monotonic() - started < 15
