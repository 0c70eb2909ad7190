"""`make demo` run for real: scripts/demo.py as a subprocess, in a keyspace and a directory of its own, with a
1-epoch model. Every step, the answers it prints against the true labels, the files it leaves, the registry's
production alias, no TorchServe process left behind, the reuse decision of a second run, and how it fails."""

from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import LOCAL_ENV, ROOT
from descendants import Descendants

DEMO = ROOT / "scripts" / "demo.py"
RUN_S = 900.0  # 1 epoch and TorchServe starting: about 30 s when the 2 cores are free, minutes when busy
STEP_LINE = re.compile(r"^\[(\d)/9\] (.+) \.\.\.$", re.MULTILINE)
TABLE_ROW = re.compile(
    r"^ +(?P<form>\S.*?) +#(?P<index>\d+) +(?P<label>\d) +(?P<answer>\d) +(?P<confidence>[01]\.\d{3})  (?P<mark>[✓✗])$",
    re.MULTILINE,
)


@dataclass
class DemoRun:
    code: int
    output: str  # stdout and stderr together, as a terminal shows them
    seen: Descendants  # every process that ran under the demo


def run_demo(environment: dict[str, str], *args: str, timeout: float = RUN_S) -> DemoRun:
    """The demo as `make demo` runs it, while every process under it (TorchServe's included) is watched."""
    process = subprocess.Popen(
        [sys.executable, str(DEMO), *args],
        cwd=ROOT,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with Descendants(process.pid) as seen:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()  # the demo stops what it started on SIGTERM
            output, _ = process.communicate(timeout=120)
            pytest.fail(f"the demo took over {timeout:.0f} s:\n{output[-4000:]}")
    return DemoRun(process.returncode, output, seen)


def load_demo_module():
    """scripts/demo.py as a module (scripts/ is no package), for its reuse decision."""
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo") / "out"


@pytest.fixture(scope="module")
def demo(cassandra_env, demo_out) -> DemoRun:
    """One demo run in the test keyspace. Run alone it loads MNIST itself; in the whole suite the Cassandra
    tests (full_load) have already loaded the keyspace, so it finds the data and skips its load."""
    run = run_demo(cassandra_env, "--epochs", "1", "--out", str(demo_out))
    assert run.code == 0, run.output[-6000:]
    return run


def runs_the_demo(test):
    """The marks of a test that needs the demo's run: the Cassandra node and a real TorchServe, a minute or more."""
    return pytest.mark.slow(pytest.mark.cassandra(pytest.mark.serve(test)))


def answers(output: str) -> list[dict]:
    return [match.groupdict() for match in TABLE_ROW.finditer(output)]


# --- a whole run ---------------------------------------------------------------------------------


@runs_the_demo
def test_every_step_runs_in_order_and_the_answers_match_the_labels(demo):
    steps = STEP_LINE.findall(demo.output)
    assert [int(number) for number, _ in steps] == list(range(1, 10)), demo.output
    assert len(re.findall(r"^ +done in [\d.]+ s$|^ +done in \d+ min \d\d s$", demo.output, re.MULTILINE)) == 9
    assert ("not loaded again" in demo.output) or ("loaded 71,000 rows" in demo.output)

    rows = answers(demo.output)
    assert len(rows) == 10 and len({row["form"] for row in rows}) == 10, demo.output  # ten digits, ten forms
    assert sorted(int(row["label"]) for row in rows) == list(range(10))
    for row in rows:  # the mark is the comparison, not decoration
        assert (row["mark"] == "✓") == (row["label"] == row["answer"]), row
    right = sum(row["label"] == row["answer"] for row in rows)
    assert right >= 9, demo.output  # a 1-epoch model reads about 98 % of the test set
    assert f"{right} of 10 read right" in demo.output


@runs_the_demo
def test_it_writes_the_metrics_plots_and_logs_and_says_where(demo, demo_out):
    model = demo_out / "model"
    for name in ("model.pt", "metrics.json", "training-curve.png", "confusion-matrix.png"):
        assert (model / name).stat().st_size > 0
    for name in ("metrics.json", "training-curve.png", "confusion-matrix.png"):
        assert str(model / name) in demo.output
    assert '"epochs": 1' in (model / "metrics.json").read_text()
    for step in ("cassandra", "load-data", "train", "archive", "publish", "promote", "serve", "predict", "stop"):
        assert (demo_out / "logs" / f"{step}.log").exists(), step
    assert "POST http://127.0.0.1:" in (demo_out / "logs" / "predict.log").read_text()  # every request and answer
    again = re.search(r"serve it again: +make serve ARCHIVE=(\S+)", demo.output)
    assert again and (ROOT / again[1]).resolve() == (demo_out / "model-store" / "mnist.mar").resolve(), demo.output
    assert (ROOT / again[1]).is_file()


@runs_the_demo
def test_torchserve_came_from_the_registry_and_nothing_is_left_running(demo, demo_out):
    # It really ran: the container's entrypoint, TorchServe's JVM under it, and its Python workers.
    assert demo.seen.ran("docker/entrypoint.py")
    assert demo.seen.ran("org.pytorch.serve.ModelServer")
    assert demo.seen.ran("model_service_worker")
    everything = set(demo.seen.everything()) - set(demo.seen.ran("CassandraDaemon"))
    _, alive = psutil.wait_procs(everything, timeout=10)
    assert not alive, [demo.seen.command(process) for process in alive]
    serve_log = (demo_out / "logs" / "serve.log").read_text()
    assert re.search(r"registry version \S+ \(production\), sha256 \w+ checked", serve_log)
    assert "entrypoint: TorchServe exited with code 143" in serve_log  # stopped by SIGTERM, as a pod is
    assert "stopped TorchServe (the entrypoint exited with 143)" in demo.output


@runs_the_demo
def test_production_points_at_the_version_it_published(demo, demo_out, cassandra, cassandra_settings):
    from registry.store import Registry, sha256

    printed = re.search(r"registry: +version (\S+) is production in (.+) \(mnist-registry", demo.output)
    assert printed, demo.output
    assert printed.group(2) == cassandra_settings.where()  # the test keyspace, never `mnist`
    production = Registry(cassandra).get("production")
    assert production.version == printed.group(1)
    assert production.sha256 == sha256((demo_out / "model-store" / "mnist.mar").read_bytes())
    assert production.epochs == 1


@runs_the_demo
def test_a_second_run_reuses_the_model_only_for_the_same_code_epochs_and_data(demo, demo_out, mnist, tmp_path):
    script = load_demo_module()
    fingerprint = mnist.fingerprint()
    model = demo_out / "model"
    trained_at = script.reusable_model(model, script.training_key(1), fingerprint)
    assert trained_at and f"reusing the model trained at {trained_at}" not in demo.output  # trained this time
    assert script.reusable_model(model, script.training_key(2), fingerprint) is None  # other --epochs
    assert script.reusable_model(model, script.training_key(None), fingerprint) is None  # the default epochs
    assert script.reusable_model(model, script.training_key(1), "0" * 64) is None  # other data
    altered = tmp_path / "model"
    shutil.copytree(model, altered)
    (altered / "model.pt").write_bytes(b"another model")
    assert script.reusable_model(altered, script.training_key(1), fingerprint) is None


# --- refusals and failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--epochs", "0"), "argument --epochs: must be at least 1, got 0"),
        (("--epochs", "two"), "argument --epochs: invalid int value: 'two'"),
        (("--bogus",), "unrecognized arguments: --bogus"),
    ],
)
def test_a_bad_flag_is_refused_before_anything_starts(flags, message, tmp_path):
    done = subprocess.run(
        [sys.executable, str(DEMO), *flags, "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=LOCAL_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "[1/9]" not in done.stdout and not (tmp_path / "out").exists()


def test_a_failing_step_is_named_with_its_log_and_the_end_of_it(tmp_path):
    """The first step fails for real: CASSANDRA_PORT names a port that accepts connections but does not speak CQL."""
    out = tmp_path / "out"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        run = run_demo({**LOCAL_ENV, "CASSANDRA_PORT": str(port)}, "--out", str(out), timeout=120)
    assert run.code == 1, run.output
    log = out / "logs" / "cassandra.log"
    assert f'demo: step "cassandra" failed; read {log}' in run.output
    reason = f"cassandra: error: 127.0.0.1:{port} is taken by something that does not speak CQL"
    assert reason in log.read_text() and f"  | {reason}" in run.output  # the log's last lines are shown
    assert "[2/9]" not in run.output  # nothing after the failed step
    assert not re.search("Cassandra node (stopped|left running)", run.output)  # it started none, so it stops none
