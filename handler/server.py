"""Run TorchServe with the mnist archive: in the foreground for `make serve`, or as a context manager for tests
and benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import psutil

from handler import front
from handler.archive import MODEL_NAME
from registry.model_archive import manifest_of

HANDLER_DIR = Path(__file__).resolve().parent
CONFIG = HANDLER_DIR / "config.properties"
LOG_CONFIG = HANDLER_DIR / "log4j2.xml"  # TorchServe's own logs a few lines per request
METRICS_CONFIG = HANDLER_DIR / "metrics.yaml"  # what /metrics serves, the handler's ModelServed among it
READY_TIMEOUT_S = 180.0  # JVM start, two workers importing torch and warming up; minutes on a busy machine
STOP_TIMEOUT_S = 30.0
DEFAULT_ARCHIVE = Path("artifacts/model-store/mnist.mar")  # where make archive writes it
# A blank 28x28 pixel array: the cheapest request that goes all the way through a worker.
PROBE = json.dumps([0] * 784).encode()
# The draw-a-digit page (ui/, `make ui`) is served from another origin than the predictions, and TorchServe
# cannot serve files: a browser lets the page read answers only when the server names the page's origin.
UI_ORIGIN = "http://127.0.0.1:8088"
# scheme://host[:port], exactly what a browser sends as Origin: no "*", no path, no list.
_ORIGIN = re.compile(r"https?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?")


class ServerError(RuntimeError):
    """TorchServe did not start or did not answer; the message quotes its log."""


@dataclass(frozen=True)
class Ports:
    """The listening ports; the defaults are those in handler/config.properties. Predictions and /ping go to
    nginx on `inference`, which passes them to TorchServe's inference API on a Unix socket (Server.backend)."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071

    @classmethod
    def free(cls) -> Ports:
        """Ports nothing listens on now, so a test server can run beside `make serve` or another test run."""
        with contextlib.ExitStack() as stack:
            sockets = [stack.enter_context(socket.socket()) for _ in fields(cls)]
            for sock in sockets:  # all bound at once, so the kernel hands out distinct ports
                sock.bind(("127.0.0.1", 0))
            return cls(*(sock.getsockname()[1] for sock in sockets))


def served_model_environment(archive: Path, version: str | None = None) -> dict[str, str]:
    """The environment that tells the handler which model it serves (mnist_handler.VERSION_ENV, SHA256_ENV):
    VERSION (the registry's; default the archive's own modelVersion) and the archive's sha256."""
    if version is None:
        with zipfile.ZipFile(archive) as mar:
            version = manifest_of(mar).get("model", {}).get("modelVersion") or "unknown"
    return {"SERVED_MODEL_VERSION": version, "SERVED_MODEL_SHA256": hashlib.sha256(archive.read_bytes()).hexdigest()}


def run_properties(text: str, allowed_origin: str = "") -> str:
    """config.properties as TorchServe runs it here: with the project's metrics (an absolute path, so the one file
    serves the checkout and the image), and the CORS lines for `allowed_origin` when one is given."""
    text = f"{text.rstrip()}\n# Added by the launcher: the metrics /metrics serves.\nmetrics_config={METRICS_CONFIG}\n"
    return text + cors_properties(allowed_origin) if allowed_origin else text


def cors_properties(origin: str) -> str:
    """The lines that let a web page at `origin` POST predictions and read the answers.

    TorchServe sends these values on every answer of every API, whatever the request's Origin; a browser then
    lets only a page of that one origin read them. The page posts JSON, so the browser first asks with OPTIONS
    (a preflight), which TorchServe answers with the same headers."""
    if not _ORIGIN.fullmatch(origin):
        raise ServerError(
            f"allowed origin {origin!r}: give one origin as a browser sends it, scheme://host[:port] "
            f"(e.g. {UI_ORIGIN}), never * or a path"
        )
    return (
        "# Added by the launcher: the one web page origin browsers may call predictions from (CORS).\n"
        f"cors_allowed_origin={origin}\ncors_allowed_methods=POST\ncors_allowed_headers=Content-Type\n"
    )


def config_with_ports(ports: Ports, base: Path = CONFIG) -> str:
    """The text of config.properties with its ports replaced and every other setting (and host) kept."""
    text = base.read_text()
    for key, port in (
        ("inference_address", ports.inference),
        ("management_address", ports.management),
        ("metrics_address", ports.metrics),
    ):
        text, count = re.subn(rf"^({key}=\S+:)\d+$", rf"\g<1>{port}", text, flags=re.MULTILINE)
        if count != 1:
            raise ServerError(f"{base}: expected one line {key}=http://HOST:PORT")
    # gRPC cannot be switched off; its ports are TorchServe's defaults unless set.
    return text + f"\ngrpc_inference_port={ports.grpc_inference}\ngrpc_management_port={ports.grpc_management}\n"


@dataclass
class Server:
    """A running TorchServe: where it answers, and its processes."""

    process: subprocess.Popen  # the `torchserve --foreground` launcher, parent of the Java frontend
    ports: Ports
    log_dir: Path
    host: str = "127.0.0.1"
    front: subprocess.Popen | None = None  # nginx, in front of TorchServe's inference API
    backend: Path | None = None  # the Unix socket of TorchServe's inference API, behind nginx

    def url(self, path: str = f"/predictions/{MODEL_NAME}", port: int | None = None) -> str:
        return f"http://{self.host}:{port or self.ports.inference}{path}"

    def frontend(self) -> psutil.Process:
        """The Java frontend (HTTP, batching, worker management)."""
        javas = [child for child in psutil.Process(self.process.pid).children() if child.name() == "java"]
        if not javas:
            raise ServerError(f"TorchServe's Java frontend is not running{log_tail(self.log_dir)}")
        return javas[0]

    def stop(self) -> None:
        """TorchServe, then nginx in front of it: a nginx left running would hold the inference port."""
        stop(self.process)
        if self.front:
            stop(self.front)

    def workers(self) -> list[psutil.Process]:
        """The Python worker processes (each runs the handler), children of the frontend."""
        workers = []
        for child in self.frontend().children():
            with contextlib.suppress(psutil.Error):  # a worker may exit while we look
                if any(part.endswith("model_service_worker.py") for part in child.cmdline()):
                    workers.append(child)
        return workers


def launch_command(archive: Path, config: Path) -> list[str]:
    """torchserve in the foreground (the launcher waits for the JVM), no config snapshots, our logging, one model."""
    launcher = Path(sys.executable).with_name("torchserve")
    return [
        str(launcher),
        "--start",
        "--foreground",
        "--ncs",
        "--ts-config",
        str(config),
        "--log-config",
        str(LOG_CONFIG),
        "--model-store",
        str(archive.parent),
        "--models",
        f"{MODEL_NAME}={archive.name}",
    ]


def launch_environment(log_dir: Path, run_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        # TorchServe writes logs/ in its working directory unless told otherwise.
        "LOG_LOCATION": str(log_dir),
        "METRICS_LOCATION": str(log_dir),
        # The launcher's pid file, the workers' Unix sockets (.ts.sock.9000, ...) and the unpacked
        # archive go to the temporary directory (TEMP for the JVM, TMPDIR for Python): a private
        # one lets several servers run side by side without taking each other's sockets.
        "TEMP": str(run_dir),
        "TMPDIR": str(run_dir),
        # One intra-op thread per worker: the workers, not threads inside one, share the cores.
        "OMP_NUM_THREADS": "1",
    }


@contextlib.contextmanager
def start_torchserve(
    archive: Path,
    log_dir: Path,
    ports: Ports = Ports(),
    config: Path = CONFIG,
    console: bool = False,
    ready_timeout: float = READY_TIMEOUT_S,
    environment: Mapping[str, str] | None = None,
    allowed_origin: str = "",
    front_on: bool = True,
) -> Iterator[Server]:
    """TorchServe serving `archive` as model mnist, answering predictions when this yields; stopped on exit.

    `config` is used as it is for the default ports, else copied with the ports changed. With
    console=False the console output goes to log_dir/console.log instead of this process's stdout.
    `environment` adds variables to the server's (and so the workers') environment. `allowed_origin`
    (scheme://host:port) is the one web page origin a browser may call predictions from; none by default.
    front_on=False leaves nginx out, TorchServe answering on ports.inference itself: the baseline of
    `python -m bench.flood`, never a way to serve.
    """
    archive, config = archive.resolve(), config.resolve()  # the launcher runs in a directory of its own
    if not archive.is_file():
        raise ServerError(f"{archive}: no such model archive; build one with `make archive`")
    log_dir = log_dir.resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    # Short, under /tmp: a Unix socket path must stay under 108 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="torchserve-"))
    try:
        text = config_with_ports(ports, config) if ports != Ports() else config.read_text()
        # In run_dir, which mkdtemp made this user's alone (mode 700).
        backend = front.backend_socket(run_dir) if front_on else None
        if backend:
            text, listen = front.behind_front(text, backend)
        config = run_dir / "config.properties"
        config.write_text(run_properties(text, allowed_origin))
        front_config = front.write_config(run_dir / "nginx", listen, backend, allowed_origin) if backend else None
        output = None if console else (log_dir / "console.log").open("ab")
        try:
            process = subprocess.Popen(
                launch_command(archive, config),
                cwd=run_dir,
                env={
                    **launch_environment(log_dir, run_dir),
                    **served_model_environment(archive),
                    **(environment or {}),
                },
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                # Its own process group: stop() then reaches the JVM and the workers with one signal.
                start_new_session=True,
            )
        finally:
            if output:
                output.close()
        server = Server(process, ports, log_dir, backend=backend)
        try:
            server.front = start_front(front_config, log_dir) if front_config else None
            wait_until_ready(server, ready_timeout)
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def start_front(config: Path, log_dir: Path) -> subprocess.Popen:
    """nginx in the foreground, its log in log_dir/nginx.log."""
    with (log_dir / "nginx.log").open("ab") as log:
        return subprocess.Popen(
            front.nginx_command(front.nginx_binary(), config),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until_ready(server: Server, timeout: float) -> None:
    """Until /ping says Healthy and a prediction is answered (the workers have loaded the model)."""
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise ServerError(
                f"TorchServe exited with code {server.process.returncode} while starting{log_tail(server.log_dir)}"
            )
        if server.front and server.front.poll() is not None:
            raise ServerError(
                f"nginx exited with code {server.front.returncode} while starting"
                f"{log_tail(server.log_dir, names=('nginx.log',))}"
            )
        if ready(server):
            return
        if time.monotonic() > deadline:
            raise ServerError(f"TorchServe did not answer predictions within {timeout:.0f} s{log_tail(server.log_dir)}")
        time.sleep(0.25)


def ready(server: Server) -> bool:
    try:
        with urllib.request.urlopen(server.url("/ping"), timeout=5) as answer:
            if json.load(answer).get("status") != "Healthy":
                return False
        request = urllib.request.Request(server.url(), data=PROBE, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status == 200
    except (OSError, ValueError):  # refused, reset, 5xx (urllib.error.URLError is an OSError), not JSON yet
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the whole process group (launcher, JVM, workers), SIGKILL whatever outlives the timeout."""
    group = process.pid  # start_new_session made the launcher the group's leader
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(group, 0)  # anyone left in the group?
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    process.wait()


def log_tail(log_dir: Path, lines: int = 30, names: tuple[str, ...] = ("ts_log.log", "console.log")) -> str:
    """The end of TorchServe's own log (or of the first of `names` with something in it), for an error message."""
    for name in names:
        path = log_dir / name
        if path.exists() and path.stat().st_size:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            return f"; the end of {path}:\n" + "\n".join(tail)
    return f"; nothing in {log_dir} yet"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m handler.server",
        description="Serve the mnist archive with TorchServe in the foreground until Ctrl-C.",
    )
    parser.add_argument(
        "--archive",
        type=Path,
        default=DEFAULT_ARCHIVE,
        help="model archive (default: %(default)s; make archive builds it)",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        default=Path("artifacts/logs"),
        help="directory for TorchServe's logs (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-origin",
        default="",
        metavar="ORIGIN",
        help=f"the one web page origin (scheme://host:port) browsers may call predictions from, e.g. {UI_ORIGIN} "
        "for `make ui`'s page (default: none)",
    )
    args = parser.parse_args(argv)
    # `kill` and Kubernetes stop with SIGTERM: leave through the context manager, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with start_torchserve(args.archive, args.logs, console=True, allowed_origin=args.allow_origin) as server:
            print(
                f"serving: POST {server.url()}  (health {server.url('/ping')}, "
                f"metrics {server.url('/metrics', server.ports.metrics)}; logs in {server.log_dir}); Ctrl-C stops it",
                flush=True,
            )
            code = server.process.wait()
            print(f"TorchServe exited with code {code}{log_tail(server.log_dir)}", file=sys.stderr)
            return 1
    except (ServerError, front.FrontError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
