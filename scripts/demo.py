#!/usr/bin/env python3
"""make demo: the whole path on this machine, from the database to answered predictions.

Starts the local Cassandra node, loads MNIST into it, trains from it (TorchScript exported and
verified), builds the model archive, publishes it to the registry and promotes it to production,
starts TorchServe through the serving container's entrypoint (docker/entrypoint.py, which fetches
production from the registry), sends real MNIST test digits in each input form the server accepts,
prints each answer beside the true label, and stops what it started.

Each step runs the project's own command (shown under the step) and writes its output to
OUT/logs/STEP.log; a failure names the step and its log. A second run reuses what still holds: the
data already in the keyspace, the model while the training code, --epochs and the data are the
same, and the archive and its registry version while the model and handler files are.

Settings: CASSANDRA_HOSTS, CASSANDRA_PORT, CASSANDRA_KEYSPACE (default mnist), as everywhere.
ASTRA_DB_* variables are ignored: the demo runs on the local node.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's training/ and handler/, however the script is started

import numpy as np  # noqa: E402 (needs the path above)
import psutil  # noqa: E402

from handler import archive  # noqa: E402
from handler.client import encoded, post  # noqa: E402
from handler.server import MODEL_NAME, Ports, config_with_ports  # noqa: E402
from registry import db  # noqa: E402
from registry.settings import SettingsError, cassandra_settings  # noqa: E402
from registry.store import Registry, sha256, short_sha256  # noqa: E402
from training.cassandra_source import LAYOUTS  # noqa: E402
from training.data import TEST_COUNT, TRAIN_COUNT, DataError, Mnist, load_mnist  # noqa: E402
from training.load_data import check_loaded  # noqa: E402

STEPS = {
    "cassandra": "start the local Cassandra node",
    "load-data": "load MNIST into Cassandra",
    "train": "train from Cassandra, export and verify TorchScript",
    "archive": "build the model archive",
    "publish": "publish it to the model registry",
    "promote": "promote it to production",
    "serve": "start TorchServe with production from the registry (docker/entrypoint.py)",
    "predict": "send real test digits in each input form",
    "stop": "stop what the demo started",
}
PREDICT_ROWS = 1000  # rows to score, as `make load-data` loads them
LOADED = {"train": TRAIN_COUNT, "test": TEST_COUNT, "predict": PREDICT_ROWS}
ALIAS = "production"
CASSANDRA = ROOT / "scripts" / "cassandra.sh"
STARTED_NODE = "cassandra: starting Cassandra"  # the script prints this only when it starts a node itself
ENTRYPOINT = ROOT / "docker" / "entrypoint.py"
BIN = Path(sys.executable).parent  # the venv's commands: python, mnist-registry
# What decides the weights besides --epochs and the data (the trainer's defaults live here too). All
# of training/, not a chosen few: simpler, and an unrelated edit costs one retraining, never a stale model.
TRAINING_CODE = sorted((ROOT / "training").glob("*.py"))
# What goes into mnist.mar besides model.pt: rebuilt when any of these is newer than the archive.
ARCHIVED = (archive.HANDLER, *archive.EXTRA_FILES, archive.MODEL_CONFIG, Path(archive.__file__))
TRAINED_BY_DEMO = "trained-by-demo.json"
STOP_WAIT_S = 60.0  # the entrypoint gives TorchServe 25 s (STOP_TIMEOUT) before it kills it
READER_WAIT_S = 10.0
INDENT = "      "


class StepFailed(Exception):
    def __init__(self, step: str, log: Path):
        super().__init__(step)
        self.step, self.log = step, log


def say(text: str) -> None:
    """A line under the current step."""
    print(f"{INDENT}{text}")


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def shown(path_or_command) -> str:
    """As a user types it in the checkout: the venv's commands by name, paths relative to the checkout."""
    if isinstance(path_or_command, (list, tuple)):
        return shlex.join(shown(word) for word in path_or_command)
    word = str(path_or_command)
    if word.startswith("/") and Path(word).parent == BIN:
        return Path(word).name
    return word.removeprefix(f"{ROOT}/")


class Child:
    """A project command as a child process: its output copied line by line into a log file,
    and the lines matching `show` echoed under the step, so progress is visible but the terminal
    is not flooded (the log has everything)."""

    def __init__(self, command: list[str], log: Path, show: str, environment: dict[str, str] | None = None):
        self.lines: list[str] = []
        self.log = log
        with log.open("a") as sink:
            sink.write(f"$ {shown(command)}\n")
        say(f"$ {shown(command)}")
        # Unbuffered: lines reach the log and the terminal as they are printed, in order.
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self.copy, args=(re.compile(show),), daemon=True)
        self.reader.start()

    def copy(self, show: re.Pattern) -> None:
        with self.log.open("a") as sink:
            for line in self.process.stdout:
                sink.write(line)
                sink.flush()
                self.lines.append(line)
                if show.search(line):
                    say(line.rstrip())

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float | None = None) -> int:
        code = self.process.wait(timeout)
        # Bounded: a grandchild that outlives the child (a TorchServe left running) keeps the pipe open.
        self.reader.join(READER_WAIT_S)
        return code


class Demo:
    """The steps, what they made, and what must be stopped at the end."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = args.out.resolve()
        self.logs = self.out / "logs"
        self.model_dir = self.out / "model"
        self.store = self.out / "model-store"
        self.serve_dir = self.out / "serve"
        self.settings = cassandra_settings()
        self.server: Child | None = None  # the entrypoint, while it runs
        self.server_tmp: Path | None = None
        self.started_node: bool | None = None  # None: the cassandra step has not finished (or the node is stopped)

    # --- running steps ----------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Path]:
        """`[3/9] title ...`, the step, `done in ...`; any error becomes StepFailed naming the step's log."""
        log = self.logs / f"{name}.log"
        log.write_text("")
        print(f"[{list(STEPS).index(name) + 1}/{len(STEPS)}] {STEPS[name]} ...")
        started = time.monotonic()
        try:
            yield log
        except StepFailed:
            raise
        except Exception:  # the details go to the log, whose end is printed with the failure
            with log.open("a") as sink:
                sink.write(traceback.format_exc())
            raise StepFailed(name, log) from None
        say(f"done in {duration(time.monotonic() - started)}")

    def run(self, log: Path, command: list[str], show: str = ".") -> str:
        """Run a command to its end; its output, or StepFailed when it exits non-zero."""
        child = Child(command, log, show)
        code = child.wait()
        if code != 0:
            with log.open("a") as sink:
                sink.write(f"demo: {shown(command)} exited with code {code}\n")
            raise StepFailed(log.stem, log)
        return child.output

    def note(self, log: Path, text: str) -> None:
        """A decision of the demo itself, on the terminal and in the step's log."""
        say(text)
        with log.open("a") as sink:
            sink.write(f"demo: {text}\n")

    # --- the steps --------------------------------------------------------------------------

    def start_cassandra(self) -> None:
        with self.step("cassandra") as log:
            output = self.run(log, [str(CASSANDRA), "up"])
            self.started_node = STARTED_NODE in output

    def load_data(self) -> Mnist:
        """MNIST into the keyspace unless it is there; returns the cached files load-data reads, whose
        fingerprint decides whether a trained model is still good and whose test digits are sent."""
        with self.step("load-data") as log:
            missing = self.first_incomplete_table()
            if missing is None:
                self.note(
                    log,
                    f"{self.settings.where()} already holds all 70,000 images and the {PREDICT_ROWS:,} to predict; "
                    f"not loaded again",
                )
            else:
                self.note(log, f"{missing} in {self.settings.where()} is not complete: loading")
                self.run(
                    log,
                    [sys.executable, "-m", "training", "load-data", "--predict", str(PREDICT_ROWS)],
                    show=r"^(data:|loaded|note:)",
                )
            return load_mnist()  # fetched once into the cache (by load-data, or here when it was skipped)

    def first_incomplete_table(self) -> str | None:
        """The first table of the blob layout without every id `make load-data` writes; None when all are there.
        Reading the ids of 71,000 rows takes a second or two; loading again takes ten or more."""
        layout = LAYOUTS["blob"]
        with db.connect(self.settings) as session:
            for split, rows in LOADED.items():
                try:
                    check_loaded(session, layout, split, rows)
                except DataError:
                    return layout.table(split)
        return None

    def train(self, mnist: Mnist) -> dict:
        """Train into OUT/model, or reuse what a previous demo trained there from the same code, flags and data."""
        with self.step("train") as log:
            key = training_key(self.args.epochs)
            trained_at = None if self.args.retrain else reusable_model(self.model_dir, key, mnist.fingerprint())
            if trained_at:
                self.note(
                    log,
                    f"reusing the model trained at {trained_at} (same training code, --epochs and data); --retrain "
                    f"to train again",
                )
            else:
                epochs = ["--epochs", str(self.args.epochs)] if self.args.epochs else []
                command = [
                    sys.executable,
                    "-m",
                    "training",
                    "train",
                    "--source",
                    "cassandra",
                    "--out",
                    str(self.model_dir),
                    *epochs,
                ]
                self.run(log, command, show=r"^(data:|epoch \d|test accuracy)")
                record = {
                    "key": key,
                    "model_sha256": file_sha256(self.model_dir / "model.pt"),
                    "trained_at": f"{datetime.now():%Y-%m-%d %H:%M}",
                }
                (self.model_dir / TRAINED_BY_DEMO).write_text(json.dumps(record, indent=2) + "\n")
            return json.loads((self.model_dir / "metrics.json").read_text())

    def build_archive(self) -> Path:
        with self.step("archive") as log:
            model, mar = self.model_dir / "model.pt", self.store / f"{MODEL_NAME}.mar"
            newest_input = max(path.stat().st_mtime for path in (model, *ARCHIVED))
            if mar.exists() and mar.stat().st_mtime > newest_input:
                self.note(log, f"reusing {shown(mar)}: newer than model.pt and the handler files it packs")
            else:
                self.run(
                    log,
                    [sys.executable, "-m", "handler.archive", "--model", str(model), "--out", str(self.store)],
                    show="^wrote",
                )
            return mar

    def publish(self, mar: Path) -> str:
        """The registry version holding this archive: an earlier one with the same sha256, else a new one."""
        with self.step("publish") as log:
            digest = file_sha256(mar)
            with db.connect(self.settings) as session:
                same = [v.version for v in Registry(session).versions() if v.sha256 == digest]
            if same:
                self.note(
                    log,
                    f"already in the registry as version {same[-1]} (same sha256 {short_sha256(digest)}); "
                    "not published again",
                )
                return same[-1]
            output = self.run(
                log,
                [str(BIN / "mnist-registry"), "publish", str(mar), "--metrics", str(self.model_dir / "metrics.json")],
            )
            return re.search(r"^published version (\S+):", output, re.MULTILINE).group(1)

    def promote(self, version: str) -> None:
        with self.step("promote") as log:
            self.run(log, [str(BIN / "mnist-registry"), "promote", version, "--alias", ALIAS])

    def serve(self) -> str:
        """The entrypoint as the container runs it (MODEL_SOURCE=registry), on free ports; returns the prediction
        URL."""
        with self.step("serve") as log:
            shutil.rmtree(self.serve_dir, ignore_errors=True)  # this run's TorchServe logs only
            for name in ("model-store", "logs"):
                (self.serve_dir / name).mkdir(parents=True)
            ports = Ports.free()  # never in the way of `make serve` or anything else on 8080
            # Short and under /tmp: the workers' Unix socket paths must stay under 108 bytes.
            self.server_tmp = Path(tempfile.mkdtemp(prefix="mnist-demo-"))
            config = self.server_tmp / "demo.properties"
            config.write_text(config_with_ports(ports))
            environment = {
                "MODEL_SOURCE": "registry",
                "MODEL_VERSION": ALIAS,
                "MODEL_STORE": str(self.serve_dir / "model-store"),
                "LOG_DIR": str(self.serve_dir / "logs"),
                "TMPDIR": str(self.server_tmp),
                "TORCHSERVE_CONFIG": str(config),
                "TERMINATION_LOG": str(self.serve_dir / "termination-log"),  # not /dev/: this is no pod
            }
            say(
                f"as in the container: MODEL_SOURCE=registry MODEL_VERSION={ALIAS}; TorchServe on free ports, its "
                f"logs in {shown(self.serve_dir / 'logs')}/"
            )
            self.server = Child([sys.executable, str(ENTRYPOINT)], log, show="^entrypoint:", environment=environment)
            # The entrypoint waits for a first answered prediction, up to its READY_TIMEOUT, and exits if none comes.
            while "entrypoint: ready" not in self.server.output:
                if self.server.process.poll() is not None:
                    self.server.wait()
                    raise StepFailed("serve", log)
                time.sleep(0.2)
            url = f"http://127.0.0.1:{ports.inference}/predictions/{MODEL_NAME}"
            say(f"TorchServe answers at {url}")
            return url

    def predict(self, url: str, mnist: Mnist) -> list[tuple]:
        with self.step("predict") as log:
            rows = ask(url, mnist, log)
            print_table(rows)
            return rows

    def stop_what_it_started(self) -> list[str]:
        """Stop TorchServe (SIGTERM to the entrypoint, as Kubernetes stops a pod), and the Cassandra node
        only if the demo started it. Safe to call twice. Returns one line per thing, for the summary."""
        done = []
        if self.server is not None:
            server, self.server = self.server, None
            if server.process.poll() is not None:
                done.append(f"TorchServe had already exited (the entrypoint with code {server.wait()})")
            else:
                server.process.send_signal(signal.SIGTERM)
                try:
                    code = server.wait(STOP_WAIT_S)
                except subprocess.TimeoutExpired:  # the entrypoint did not stop: kill it and all under it
                    for process in [*psutil.Process(server.process.pid).children(recursive=True), server.process]:
                        with contextlib.suppress(psutil.Error, ProcessLookupError):
                            process.kill()
                    code = server.wait()
                # 143 = 128 + SIGTERM: the JVM ran its shutdown hooks and stopped its workers.
                done.append(
                    f"stopped TorchServe (the entrypoint exited with "
                    f"{code}{'' if code == 143 else f', not 143: see {shown(server.log)}'})"
                )
        if self.server_tmp is not None:
            shutil.rmtree(self.server_tmp, ignore_errors=True)
            self.server_tmp = None
        if self.started_node:
            self.started_node = None
            log = self.logs / "stop.log"
            stopped = Child([str(CASSANDRA), "down"], log, show="^cassandra: stopped").wait() == 0
            done.append(
                "Cassandra node stopped (the demo had started it)"
                if stopped
                else f"the Cassandra node the demo started did not stop: see {shown(log)}"
            )
        elif self.started_node is False:
            done.append("Cassandra node left running (it was up before the demo)")
        return done

    def stop(self) -> list[str]:
        with self.step("stop") as log:
            done = self.stop_what_it_started()
            with log.open("a") as sink:
                sink.writelines(f"demo: {line}\n" for line in done)
            return done  # printed in the summary


# --- reuse --------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    return sha256(path.read_bytes())


def training_key(epochs: int | None) -> str:
    """What decides the model besides the data: the training code (defaults included) and --epochs."""
    digest = hashlib.sha256(f"epochs={epochs or 'default'}\n".encode())
    for path in TRAINING_CODE:
        digest.update(f"{path.name}\n".encode() + path.read_bytes())
    return digest.hexdigest()


def reusable_model(model_dir: Path, key: str, data_fingerprint: str) -> str | None:
    """When the demo trained model_dir's model from the same code, --epochs and data: when it did."""
    try:
        record = json.loads((model_dir / TRAINED_BY_DEMO).read_text())
        metrics = json.loads((model_dir / "metrics.json").read_text())
        same_model = record["model_sha256"] == file_sha256(model_dir / "model.pt")
    except (OSError, ValueError, KeyError):
        return None  # never trained here, or something is missing: train
    if record["key"] == key and same_model and metrics.get("data_fingerprint") == data_fingerprint:
        return record["trained_at"]
    return None


# --- the digits ---------------------------------------------------------------------------------


def base64_of(data: bytes) -> str:
    return base64.b64encode(data).decode()


def as_json(document) -> tuple[bytes, str]:
    return json.dumps(document).encode(), "application/json"


# One request per digit in each of these forms (docs/api.md) ...
SINGLE = {
    "PNG body, image/png": lambda image: (encoded(image), "image/png"),
    "JPEG body, octet-stream": lambda image: (encoded(image, "JPEG"), "application/octet-stream"),
    'JSON {"data": base64 PNG}': lambda image: as_json({"data": base64_of(encoded(image))}),
    "JSON 28x28 pixel array": lambda image: as_json(image.tolist()),
    "JSON 784 flat pixel array": lambda image: as_json(image.ravel().tolist()),
}
# ... and one {"instances": [...]} request with a digit in each of these.
INSTANCES = {
    "base64 PNG": lambda image: base64_of(encoded(image)),
    "data: URL": lambda image: f"data:image/png;base64,{base64_of(encoded(image))}",
    "base64 JPEG": lambda image: base64_of(encoded(image, "JPEG")),
    "28x28 array": lambda image: image.tolist(),
    "784 flat array": lambda image: image.ravel().tolist(),
}


def ask(url: str, mnist: Mnist, log: Path) -> list[tuple]:
    """The first test image of each digit, 0 to 9, sent in the forms above. Returns rows of
    (form, test image index, label, answer, confidence); requests and answers go to the log."""
    chosen = [int(np.flatnonzero(mnist.test_labels == digit)[0]) for digit in range(10)]
    single, batched = chosen[: len(SINGLE)], chosen[len(SINGLE) :]
    requests = [
        ([form], [index], *make(mnist.test_images[index]))
        for (form, make), index in zip(SINGLE.items(), single, strict=True)
    ]
    instances = [make(mnist.test_images[index]) for make, index in zip(INSTANCES.values(), batched, strict=True)]
    batch_forms = [f"instances[{number}]: {form}" for number, form in enumerate(INSTANCES)]
    requests.append((batch_forms, batched, *as_json({"instances": instances})))

    rows = []
    with log.open("a") as sink:
        for forms, indexes, body, content_type in requests:
            status, answer, _ = post(url, body, content_type)
            sink.write(
                f"POST {url} ({content_type}, {len(body):,} bytes: {', '.join(forms)}) -> {status} "
                f"{json.dumps(answer)}\n"
            )
            if status != 200:
                raise RuntimeError(f"the server answered {status} to the {forms[0]} request: {answer}")
            answers = answer["predictions"] if len(indexes) > 1 else [answer]
            for form, index, reply in zip(forms, indexes, answers, strict=True):
                rows.append((form, index, int(mnist.test_labels[index]), reply["digit"], reply["confidence"]))
    return rows


def print_table(rows: list[tuple]) -> None:
    width = max(len(row[0]) for row in rows)
    say(f"{'form':<{width}}  test image  label  answer  confidence")
    for form, index, label, digit, confidence in rows:
        say(
            f"{form:<{width}}  {f'#{index}':>10}  {label:>5}  {digit:>6}  {confidence:>10.3f}  "
            f"{'✓' if digit == label else '✗'}"
        )
    say(f"{read_right(rows)} of {len(rows)} read right")


def read_right(rows: list[tuple]) -> int:
    return sum(label == digit for _, _, label, digit, _ in rows)


# --- the whole run ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/demo.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, help="training epochs (default: the trainer's default)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("artifacts/demo"),
        help="model, archive, TorchServe files and logs (default: %(default)s)",
    )
    parser.add_argument("--retrain", action="store_true", help="train even when the model of an earlier run would do")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"argument --epochs: must be at least 1, got {args.epochs}")
    return args


def run_steps(demo: Demo) -> dict:
    demo.start_cassandra()
    mnist = demo.load_data()
    metrics = demo.train(mnist)
    version = demo.publish(demo.build_archive())
    demo.promote(version)
    rows = demo.predict(demo.serve(), mnist)
    return {"metrics": metrics, "version": version, "rows": rows, "stopped": demo.stop()}


def print_summary(demo: Demo, result: dict, seconds: float) -> None:
    metrics, rows = result["metrics"], result["rows"]
    model = demo.model_dir
    print(f"demo: done in {duration(seconds)}")
    for label, value in (
        ("answers", f"{read_right(rows)} of {len(rows)} test digits read right"),
        (
            "metrics",
            f"{shown(model / 'metrics.json')} (test accuracy {metrics['test_accuracy']:.2%} after "
            f"{metrics['epochs']} epoch{'s' if metrics['epochs'] != 1 else ''})",
        ),
        ("training curve", shown(model / "training-curve.png")),
        ("confusion matrix", shown(model / "confusion-matrix.png")),
        (
            "registry",
            f"version {result['version']} is {ALIAS} in {demo.settings.where()} (mnist-registry show {ALIAS})",
        ),
        ("logs", f"{shown(demo.logs)}/, TorchServe's in {shown(demo.serve_dir / 'logs')}/"),
        ("serve it again", f"make serve ARCHIVE={shown(demo.store / 'mnist.mar')} (nothing retrained)"),
    ):
        print(f"  {label + ':':<18}{value}")
    print(f"  {'; '.join(result['stopped'])}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows at once, also through a pipe
    # The demo runs on the local node: a developer's Astra settings must not send its data there.
    for name in [name for name in os.environ if name.startswith("ASTRA_DB_")]:
        del os.environ[name]
    # SIGTERM (kill, a CI timeout) leaves through the handlers below, which stop what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        demo = Demo(args)
    except SettingsError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 2
    demo.logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        result = run_steps(demo)
    except StepFailed as failure:
        stopped = demo.stop_what_it_started()
        lines = failure.log.read_text(errors="replace").splitlines()[-15:]
        if stopped:
            print(f"demo: {'; '.join(stopped)}", file=sys.stderr)
        print(f'demo: step "{failure.step}" failed; read {shown(failure.log)}', file=sys.stderr)
        print("\n".join(f"  | {line[:300]}" for line in lines), file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as stop:
        print(f"\ndemo: interrupted; {'; '.join(demo.stop_what_it_started()) or 'nothing to stop'}", file=sys.stderr)
        return 130 if isinstance(stop, KeyboardInterrupt) else stop.code
    print_summary(demo, result, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
