"""Shared fixtures: the real local Cassandra node and a fresh keyspace per test run, MNIST, the archives; and,
from the helper modules at the end, a TorchServe per module, the pinned helm, the kwok cluster, the entrypoint's pod."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Astra variables are dropped so a developer's Astra credentials never point the tests at Astra.
LOCAL_ENV = {key: value for key, value in os.environ.items() if not key.startswith("ASTRA_DB_")}
NOTEBOOK_ROWS = 1000  # the notebook layout writes ~1,000 rows/s: a subset, where the full set is not the point


def cassandra_script(command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "scripts" / "cassandra.sh"), command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=LOCAL_ENV,
    )


@pytest.fixture(scope="session")
def cassandra_settings():
    """Settings for a local node (CASSANDRA_HOSTS/PORT as the developer set them) and a keyspace
    of this run's own, so tests never touch the `mnist` keyspace and can run side by side.
    A node the tests had to start is stopped again at the end; one already running stays."""
    from registry.settings import cassandra_settings as from_environment

    was_running = cassandra_script("status").returncode == 0
    started = cassandra_script("up")
    if started.returncode != 0:
        pytest.fail(f"scripts/cassandra.sh up failed:\n{started.stdout}{started.stderr}")
    yield replace(from_environment(LOCAL_ENV), keyspace=f"test_{os.getpid()}_{secrets.token_hex(3)}")
    if not was_running:
        cassandra_script("down")


@pytest.fixture(scope="session")
def cassandra(cassandra_settings):
    """A session on the fresh test keyspace with the schema applied; the keyspace is dropped at the end."""
    from registry import db

    with db.connect(cassandra_settings) as session:
        try:
            yield session
        finally:
            session.execute(f"DROP KEYSPACE IF EXISTS {cassandra_settings.keyspace}")


@pytest.fixture(scope="session")
def cassandra_env(cassandra, cassandra_settings) -> dict[str, str]:
    """Environment for a subprocess (a CLI run) that should use the test keyspace."""
    return {**LOCAL_ENV, "CASSANDRA_KEYSPACE": cassandra_settings.keyspace}


class AstraLocal:
    """scripts/astra_local.py's stand-in for Astra's connection path, as the tests use it: the variables of either
    way in (the bundle and token, or the node directly with TLS and a login), and the role the token holds."""

    def __init__(self, keyspace: str):
        sys.path.insert(0, str(ROOT / "scripts"))
        import astra_local

        self.module = astra_local
        self.keyspace = keyspace
        self.paths = astra_local.paths()
        self.token_role = "writer"  # what `up` issues

    def variables(self, way: str, role: str) -> dict[str, str]:
        """What points a command at the stand-in as ROLE, through the bundle (way "bundle") or directly ("direct")."""
        if way == "bundle":
            self.use_token(role)
        # A keyspace for each way in: the bundle's is made by the stand-in (as Astra's console makes one), the
        # direct one by the writer role on first use (as a self-hosted cluster lets it).
        keyspace = self.keyspace if way == "bundle" else f"{self.keyspace}_direct"
        return self.module.variables(self.paths, keyspace, direct=way == "direct", role=role)

    def env(self, way: str, role: str) -> dict[str, str]:
        """The whole environment of such a command: this one's, without other database settings."""
        local = {key: value for key, value in LOCAL_ENV.items() if not key.startswith("CASSANDRA_")}
        return {**local, **self.variables(way, role)}

    def use_token(self, role: str) -> None:
        if role != self.token_role:
            self.module.issue_token(self.paths, role)
            self.token_role = role

    def secrets(self) -> list[str]:
        """The token and the passwords, which no output may ever show."""
        files = [
            self.paths.token,
            *(self.paths.password(role) for role in self.module.ROLES),
            self.paths.file("superuser.password"),
        ]
        return [path.read_text().strip() for path in files]


@pytest.fixture(scope="session")
def astra_local(cassandra_settings) -> AstraLocal:
    """The stand-in, started once for the session (new certificates, an empty node, roles, HAProxy), stopped at the end.
    Its node shares the jars scripts/cassandra.sh fetched for the shared node (hence cassandra_settings)."""
    keyspace = "mnist_astra"
    script = [sys.executable, str(ROOT / "scripts" / "astra_local.py")]
    started = subprocess.run(
        [*script, "up", "--keyspace", keyspace], capture_output=True, text=True, timeout=600, env=LOCAL_ENV
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield AstraLocal(keyspace)
    finally:
        subprocess.run([*script, "down"], capture_output=True, text=True, timeout=300, env=LOCAL_ENV)


def run_cli(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` as a user runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def mnist():
    from training.data import load_mnist

    return load_mnist()


@pytest.fixture(scope="session")
def full_load(cassandra_env) -> subprocess.CompletedProcess:
    """All 70,000 images (and 1,000 to predict) loaded into the blob layout once, by the CLI."""
    return run_cli(cassandra_env, "training", "load-data", "--predict", "1000")


@pytest.fixture(scope="session")
def model_archive(tmp_path_factory) -> Path:
    """A real .mar from torch-model-archiver around a scripted (untrained, seeded) MNIST Net."""
    import torch

    from training import export
    from training.model import Net

    directory = tmp_path_factory.mktemp("mar")
    torch.manual_seed(0)
    export.script(Net()).save(str(directory / "model.pt"))
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run(
        [
            str(archiver),
            "--model-name",
            "mnist",
            "--version",
            "1.0",
            "--serialized-file",
            str(directory / "model.pt"),
            "--handler",
            "image_classifier",
            "--export-path",
            str(directory),
            "--force",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return directory / "mnist.mar"


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> Path:
    """mnist.mar around the reference model (the model `make train` makes), in a model store of its own.
    Shared by the tests of every phase: none changes it (those that damage an archive damage a copy)."""
    from reference_model import reference_model_dir, same_but_for_times

    from handler.archive import build_archive, version_from_metrics

    model = reference_model_dir()
    archive = build_archive(
        model / "model.pt", tmp_path_factory.mktemp("model-store"), version_from_metrics(model / "metrics.json")
    )
    # The bytes of the last session's archive when only the times in it differ: the images built around it
    # (the kind smoke test's node image holds one) are then the cached ones, not new ones each session.
    kept = model / "mnist.mar"
    if kept.is_file() and same_but_for_times(kept, archive):
        shutil.copyfile(kept, archive)
    else:
        shutil.copyfile(archive, model / ".mnist.mar.new")
        (model / ".mnist.mar.new").replace(kept)
    return archive


@pytest.fixture(scope="session")
def metrics_file(tmp_path_factory) -> Path:
    """A metrics.json with the keys training/job.py writes and the registry records."""
    import json

    path = tmp_path_factory.mktemp("metrics") / "metrics.json"
    path.write_text(
        json.dumps(
            {
                "test_accuracy": 0.9931,
                "test_loss": 0.0213,
                "epochs": 8,
                "parameters": {"epochs": 8, "lr": 0.01},
                "data_fingerprint": "06b0d1f1" * 8,
                "git_commit": "0123abc",
                "torch_version": "2.14.1",
            }
        )
    )
    return path


# --- the Kubernetes tools, built while the first tests run ---------------------------------------------
# A new machine builds them from Go modules (about 20 minutes of its 2 cores), and the tests before the ones
# that need them leave a core idle much of the time, waiting for servers and databases. So when the session
# holds those tests, a background job builds the tools one by one at low priority; a test that needs one still
# runs scripts/install-k8s-tools.sh, which waits for a build under way (its lock) and skips a finished one.
PREBUILT = ("helm", "kwok", "etcd", "kube", "gateway-api-crds", "kube-node", "kind", "coredns", "kube-router")
NEED_TOOLS = {"test_chart_cluster.py", "test_train_chart_cluster.py", "test_kind_smoke.py"}
_prebuild: list[subprocess.Popen] = []


def pytest_collection_finish(session):
    if not any(Path(str(item.fspath)).name in NEED_TOOLS for item in session.items):
        return
    from training.config import cache_dir

    log = cache_dir() / "build" / "prebuild.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    install = ROOT / "scripts" / "install-k8s-tools.sh"
    loop = f'for tool in {" ".join(PREBUILT)}; do "{install}" "$tool" || exit 1; done'
    with log.open("w") as output:
        _prebuild.append(low_priority(["bash", "-c", loop], output))


def low_priority(command: list[str], output) -> subprocess.Popen:
    """`command` at nice 15, in a process group of its own (killed as one) but in the tests' session: the
    kernel shares the CPU fairly between sessions (autogroups) whatever their nice values, so in a session of
    its own the build would take a whole core from the tests, and training whose two threads wait for each
    other would crawl."""
    return subprocess.Popen(
        ["nice", "-n", "15", *command],
        stdout=output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        process_group=0,
    )


def pytest_sessionfinish(session):
    for process in _prebuild:  # a session cut short: a build left half done is redone by the next run
        if process.poll() is None:
            os.killpg(process.pid, 15)


# --- time per phase ----------------------------------------------------------------------------------
# Each test file is a phase of `make test` (its first test's set-up includes what its fixtures build:
# the Kubernetes tools, the image venv, the reference model), so the budget can be read off one run.
_seconds_per_file: dict[str, float] = {}


def pytest_runtest_logreport(report):
    file = report.nodeid.split("::")[0]
    _seconds_per_file[file] = _seconds_per_file.get(file, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _seconds_per_file:
        return
    terminalreporter.section("seconds per test file (set-up, tests, tear-down)")
    for file, seconds in sorted(_seconds_per_file.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {file}")
    terminalreporter.write_line(f"{sum(_seconds_per_file.values()):8.1f}  in all")


# --- fixtures of the helper modules ------------------------------------------------------------------
# Imported here, after LOCAL_ENV and ROOT, which they take from this module: pytest offers a conftest's fixtures
# to every test module, so no test module imports another.
from bodies import zip_bomb  # noqa: E402
from entrypoint_pod import pod, python  # noqa: E402, F401
from helm_chart import helm  # noqa: E402, F401
from kwok_cluster import api, kubeconfig  # noqa: E402, F401
from served import allowed_origin, digits, known, server  # noqa: E402, F401


@pytest.fixture(scope="module")
def zip_bomb_png() -> bytes:
    """A valid PNG of 10,000 x 10,000 black pixels: ~100 KB that inflates to 100 MB."""
    return zip_bomb()
