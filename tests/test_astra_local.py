"""Astra's connection path for real, on the local stand-in (scripts/astra_local.py): a secure connect bundle, the
metadata service and SNI proxy (HAProxy), TLS with client certificates, the token as the password of `token`, and
roles as production uses them. The same node reached directly, as a self-hosted cluster with TLS and a login is.
The product's own commands run through both ways in, pointed there only by the variables a user sets; each fault
is one line within seconds; no token or password ever shows in an output or a command line."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from entrypoint_pod import READY_S, Running, post_digit

from bench.big_archive import big_archive

pytestmark = [pytest.mark.slow, pytest.mark.cassandra]

WAYS = ("bundle", "direct")
FAULT_S = 15.0  # "within seconds": the connect timeout is 5 s


class Secrets:
    """Every output of the module's commands, checked for the token and the passwords; and a watcher of every
    process's command line while commands run (what `ps` shows)."""

    def __init__(self, astra_local):
        self.astra_local = astra_local
        self.seen_on_a_command_line: list[str] = []
        self.stop = threading.Event()
        self.watcher = threading.Thread(target=self.watch, daemon=True)
        self.watcher.start()

    def watch(self) -> None:
        while not self.stop.wait(0.05):
            values = self.astra_local.secrets()
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                self.seen_on_a_command_line += [text for value in values if value in text]

    def check(self, text: str) -> str:
        for value in self.astra_local.secrets():
            assert value not in text, "a token or password was printed"
        return text


@pytest.fixture(scope="module")
def secrets(astra_local):
    watching = Secrets(astra_local)
    yield watching
    watching.stop.set()
    watching.watcher.join(5)
    assert not watching.seen_on_a_command_line, "a token or password was on a command line"


def run(secrets: Secrets, env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = run_cli(env, *args, timeout=timeout)
    secrets.check(done.stdout + done.stderr)
    return done


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def metrics() -> Path:
    """The reference model's metrics.json, published with its archive."""
    from reference_model import reference_model_dir

    return reference_model_dir() / "metrics.json"


# --- the product through each way in ----------------------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
def test_load_train_publish_promote_download_and_predict_as_the_writer(
    way, astra_local, secrets, archive, metrics, tmp_path
):
    env = astra_local.env(way, "writer")
    loaded = run(secrets, env, "training", "load-data", "--limit", "600", "--predict", "40")
    assert loaded.returncode == 0 and "count check passed" in loaded.stdout, loaded.stdout + loaded.stderr
    trained = run(
        secrets,
        env,
        "training",
        "train",
        "--source",
        "cassandra",
        "--any-count",
        "--epochs",
        "1",
        "--val-size",
        "100",
        "--out",
        str(tmp_path / "model"),
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "data: 600 training and 600 test images from cassandra" in trained.stderr, trained.stderr
    assert "after 1 epochs" in trained.stdout and (tmp_path / "model" / "model.pt").exists()

    published = run(
        secrets, env, "registry.cli", "publish", str(archive), "--metrics", str(metrics), "--version", f"{way}-1"
    )
    assert published.returncode == 0 and f"published version {way}-1" in published.stdout, published.stderr
    assert run(secrets, env, "registry.cli", "promote", f"{way}-1", "--alias", "production").returncode == 0
    listed = run(secrets, env, "registry.cli", "list")
    assert re.search(rf"^{way}-1 .* production$", listed.stdout, re.MULTILINE), listed.stdout
    downloaded = run(secrets, env, "registry.cli", "download", "production", "--out", str(tmp_path / "store"))
    assert downloaded.returncode == 0 and sha256(tmp_path / "store" / "mnist.mar") == sha256(archive)
    predicted = run(secrets, env, "training", "predict-table", "--version", "production")
    assert f"scored 40 rows of predict_images with model version {way}-1" in predicted.stdout, (
        predicted.stdout + predicted.stderr
    )


@pytest.mark.serve
@pytest.mark.parametrize("way", WAYS)
def test_the_server_gets_its_model_with_the_read_only_role(way, astra_local, secrets, python, pod):  # noqa: F811
    """docker/entrypoint.py as the pod runs it, from the registry, with the role that may only read."""
    running = Running(
        python, pod, MODEL_SOURCE="registry", MODEL_VERSION="production", **astra_local.variables(way, "reader")
    )
    try:
        running.wait_for("entrypoint: ready", READY_S)
        assert f"registry version {way}-1 (production)" in running.output
        assert post_digit(pod.ports.inference)["digit"] == 7
    finally:
        running.process.terminate()
        running.finish(60)
    secrets.check(running.output + pod.termination_message)


@pytest.mark.parametrize("way", WAYS)
def test_the_read_only_role_cannot_publish_and_nothing_is_written(way, astra_local, secrets, archive, metrics):
    env = astra_local.env(way, "reader")
    refused = run(
        secrets,
        env,
        "registry.cli",
        "publish",
        str(archive),
        "--metrics",
        str(metrics),
        "--version",
        f"{way}-read-only",
    )
    line = one_error_line(refused)
    user = "token" if way == "bundle" else "mnist_reader"
    assert re.search(rf"not permitted: User {user} has no MODIFY permission on <table \w+\.archive_chunks>", line), line
    # Not a version, not a chunk.
    listed = run(secrets, env, "registry.cli", "list")
    assert listed.returncode == 0 and f"{way}-1" in listed.stdout and f"{way}-read-only" not in listed.stdout
    from registry import db
    from registry.settings import cassandra_settings

    with db.connect(cassandra_settings(env), create_schema=False) as session:
        assert (
            session.execute("SELECT count(*) FROM archive_chunks WHERE version = %s", (f"{way}-read-only",)).one()[0]
            == 0
        )


# --- faults: one line within seconds ------------------------------------------------------------------------


def bundle_variant(astra_local, tmp_path: Path, **change) -> Path:
    """A copy of the stand-in's bundle with a file left out (leave_out=NAME) or replaced (NAME=bytes)."""
    target = tmp_path / "bundle.zip"
    with zipfile.ZipFile(astra_local.paths.bundle) as original, zipfile.ZipFile(target, "w") as copy:
        for name in original.namelist():
            if name != change.get("leave_out"):
                copy.writestr(name, change.get(name.replace(".", "_"), original.read(name)))
    return target


def other_ca_client(astra_local, tmp_path: Path) -> dict[str, bytes]:
    """A client certificate and key signed by a CA the stand-in does not know."""
    astra_local.module.make_certificates(tmp_path / "other", {"client": ""})
    return {
        "cert": (tmp_path / "other" / "client.crt").read_bytes(),
        "key": (tmp_path / "other" / "client.key").read_bytes(),
    }


FAULTS = {
    "wrong token": (
        lambda a, t: {"ASTRA_DB_TOKEN": "AstraCS:wrong:" + "0" * 64, "ASTRA_DB_TOKEN_FILE": ""},
        r"Failed to authenticate to .*: .*Provided username token and/or password are incorrect",
    ),
    "not a zip": (
        lambda a, t: {"ASTRA_DB_SECURE_BUNDLE": str(write(t / "bundle.zip", b"<html>sign in</html>"))},
        r"ASTRA_DB_SECURE_BUNDLE=.* is not a zip file",
    ),
    "a file missing": (
        lambda a, t: {"ASTRA_DB_SECURE_BUNDLE": str(bundle_variant(a, t, leave_out="key"))},
        r"lacks key \(a secure connect bundle holds config.json, ca.crt, cert, key\)",
    ),
    "a certificate the server refuses": (
        lambda a, t: {"ASTRA_DB_SECURE_BUNDLE": str(bundle_variant(a, t, **other_ca_client(a, t)))},
        r"metadata service at https://127.0.0.1:29080/metadata.*\(.*alert unknown ca",
    ),
    "the metadata service down": (
        lambda a, t: {
            "ASTRA_DB_SECURE_BUNDLE": str(
                bundle_variant(a, t, config_json=json.dumps({"host": "127.0.0.1", "port": 1}).encode())
            )
        },
        r"Unable to connect to the metadata service at https://127.0.0.1:1/metadata.*Connection refused",
    ),
}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_one_line_within_seconds(fault, astra_local, secrets, tmp_path):
    change, expected = FAULTS[fault]
    env = {**astra_local.env("bundle", "reader"), **change(astra_local, tmp_path)}
    started = time.monotonic()
    line = one_error_line(run(secrets, env, "registry.cli", "list", timeout=60))
    assert time.monotonic() - started < FAULT_S
    assert re.search(expected, line), line
    assert "AstraCS:" not in line  # not even a wrong token


def test_a_traceback_shows_no_token(astra_local, secrets, tmp_path):
    """An error nobody catches while the token is in use: Python's traceback shows code and messages, not it."""
    down = bundle_variant(astra_local, tmp_path, config_json=json.dumps({"host": "127.0.0.1", "port": 1}).encode())
    for token_setting in ("ASTRA_DB_TOKEN_FILE", "ASTRA_DB_TOKEN"):
        env = {**astra_local.env("bundle", "reader"), "ASTRA_DB_SECURE_BUNDLE": str(down)}
        if token_setting == "ASTRA_DB_TOKEN":
            env["ASTRA_DB_TOKEN"] = astra_local.paths.token.read_text().strip()
            del env["ASTRA_DB_TOKEN_FILE"]
        code = (
            "from registry import db\n"
            "from registry.settings import cassandra_settings\n"
            "with db.connect(cassandra_settings()):\n"
            "    pass"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert (
            done.returncode == 1
            and "Traceback (most recent call last)" in done.stderr
            and "DatabaseError: cannot connect" in done.stderr
        )
        secrets.check(done.stderr)


def test_a_download_survives_the_proxy_going_down_mid_way(astra_local, secrets, metrics_file, tmp_path):
    """HAProxy stopped while the chunks stream (and its connections with it), started again 2 s later: the
    download's retry rule takes it from the start, and the archive arrives whole."""
    writer = astra_local.env("bundle", "writer")
    big = big_archive(tmp_path / "big.mar", 64)
    assert (
        run(
            secrets, writer, "registry.cli", "publish", str(big), "--metrics", str(metrics_file), "--version", "big-1"
        ).returncode
        == 0
    )
    reader = astra_local.env("bundle", "reader")
    out = tmp_path / "out"
    out.mkdir()
    download = subprocess.Popen(
        [sys.executable, "-m", "registry.cli", "download", "big-1", "--out", str(out)],
        cwd=ROOT,
        env=reader,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(path.stat().st_size > 0 for path in out.glob(".big.mar.*")):  # the first chunks are in
        assert download.poll() is None and time.monotonic() < deadline, download.communicate()
        time.sleep(0.01)
    # Paused while the proxy stops, so the cut falls mid-way however fast the rest would have come.
    download.send_signal(signal.SIGSTOP)
    try:
        assert list(out.glob(".big.mar.*")), "the download finished before the proxy could stop"
        astra_local.module.stop_proxy(astra_local.paths)
    finally:
        download.send_signal(signal.SIGCONT)
    time.sleep(2)
    astra_local.module.start_proxy(astra_local.paths)
    stdout, stderr = download.communicate(timeout=120)
    secrets.check(stdout + stderr)
    assert download.returncode == 0, stderr
    assert "mnist-registry: attempt 1 failed" in stderr
    assert sha256(out / "big.mar") == sha256(big) and not list(out.glob(".big.mar.*"))
