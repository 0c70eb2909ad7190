#!/usr/bin/env python3
"""The serving container's entrypoint: get the model archive, then run TorchServe in the foreground.

It runs as PID 1. It takes the archive from the model registry (MODEL_SOURCE=registry: the version or
alias MODEL_VERSION, checksum-verified by the registry code) or from the image (MODEL_SOURCE=image),
checks it, starts TorchServe's Java frontend as its own child, waits until a prediction is answered,
writes READY_FILE (the chart's startup probe checks it), and then waits until TorchServe exits. SIGTERM
and SIGINT are forwarded, so TorchServe stops its workers and exits; its exit code becomes the
container's. A failure exits non-zero with one message on stderr and in the termination log
(/dev/termination-log), which Kubernetes shows in the pod's status.

Settings, from the environment (the image sets the paths; the chart sets the rest):
  MODEL_SOURCE       registry | image (default registry)
  MODEL_VERSION      registry version or alias (default production)
  MODEL_ARCHIVE      the archive baked into the image (default /opt/mnist-serve/model/mnist.mar)
  MODEL_STORE        where the archive is put for TorchServe (writable; default /home/model-server/model-store)
  LOG_DIR            TorchServe's log files (writable; default /home/model-server/logs)
  TMPDIR             worker sockets, the unpacked archive, the run's config (writable; default /tmp)
  TORCHSERVE_CONFIG  config.properties to start from (default handler/config.properties beside this file)
  NUMBER_OF_GPU      GPUs TorchServe may give its workers (TorchServe's number_of_gpu; default 0: CPU)
  READY_TIMEOUT      seconds for the model to answer its first prediction (default 300)
  READY_FILE         written once a prediction was answered, removed at start and stop (default TMPDIR/mnist-serve-ready)
  STOP_TIMEOUT       seconds TorchServe gets to stop after SIGTERM before it is killed (default 25)
  TERMINATION_LOG    where the failure message goes (default /dev/termination-log)
  CASSANDRA_*, ASTRA_DB_*   the registry's connection, read by registry/settings.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

APP = Path(__file__).resolve().parent.parent  # the repository, or /opt/mnist-serve in the image
sys.path.insert(0, str(APP))  # registry/ and handler/, however this file is started

from handler.server import LOG_CONFIG, MODEL_NAME, PROBE, log_tail, run_properties, served_model_environment  # noqa: E402 (needs the path above)

SOURCES = ("registry", "image")
ARCHIVE_FILE = f"{MODEL_NAME}.mar"  # the name in the model store, whatever the registry called it
MANIFEST = "MAR-INF/MANIFEST.json"
LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}
MESSAGE_LIMIT = 4096  # Kubernetes keeps at most this many bytes of a termination message
POLL_S = 0.25


class StartupError(Exception):
    """The container cannot serve; the message says what was wrong and what to do."""


class Stopped(Exception):
    """A stop signal arrived before TorchServe was started."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Settings:
    source: str
    version: str
    archive: Path
    model_store: Path
    log_dir: Path
    tmp_dir: Path
    config: Path
    gpus: int
    ready_timeout: float
    ready_file: Path
    stop_timeout: float
    termination_log: Path


def settings_from(environ: Mapping[str, str]) -> Settings:
    """The settings, checked; raises StartupError naming the variable and the fix."""

    def text(name: str, default: str) -> str:
        return environ.get(name, "").strip() or default

    def number(name: str, default: float, kind: type = float, least: float = 1):
        raw = text(name, "")
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            value = None
        if value is None or value < least:
            raise StartupError(f"{name}={raw!r} is not a {'whole ' if kind is int else ''}number >= {least}")
        return value

    source = text("MODEL_SOURCE", "registry")
    if source not in SOURCES:
        raise StartupError(f"MODEL_SOURCE={source!r} is not one of {', '.join(SOURCES)} (registry: download MODEL_VERSION; image: the archive built into the image)")
    version = text("MODEL_VERSION", "production")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", version):  # the registry's rule for versions and aliases
        raise StartupError(f"MODEL_VERSION={version!r} is not a version or alias name (letters, digits, '.', '_', '-'; 64 at most)")
    tmp_dir = Path(text("TMPDIR", tempfile.gettempdir()))
    return Settings(
        source=source,
        version=version,
        archive=Path(text("MODEL_ARCHIVE", "/opt/mnist-serve/model/mnist.mar")),
        model_store=Path(text("MODEL_STORE", "/home/model-server/model-store")),
        log_dir=Path(text("LOG_DIR", "/home/model-server/logs")),
        tmp_dir=tmp_dir,
        config=Path(text("TORCHSERVE_CONFIG", str(APP / "handler" / "config.properties"))),
        gpus=number("NUMBER_OF_GPU", 0, int, least=0),
        ready_timeout=number("READY_TIMEOUT", 300.0),
        ready_file=Path(text("READY_FILE", str(tmp_dir / "mnist-serve-ready"))),
        stop_timeout=number("STOP_TIMEOUT", 25.0),
        termination_log=Path(text("TERMINATION_LOG", "/dev/termination-log")),
    )


# --- the archive ----------------------------------------------------------------------------------

def fetch_from_registry(settings: Settings) -> tuple[Path, str, str]:
    """Download MODEL_VERSION into the model store; the registry checks every chunk and the whole sha256.
    Returns the archive, where it came from (for the log) and the registry version."""
    from registry import db
    from registry.settings import SettingsError, cassandra_settings
    from registry.store import Registry, RegistryError

    try:
        connection = cassandra_settings()
    except SettingsError as error:
        raise StartupError(f"registry settings: {error}") from None
    try:
        with db.connect(connection, create_schema=False) as session:  # a read-only role is enough to serve
            version, path = Registry(session).download(settings.version, settings.model_store)
    except db.DatabaseError as error:
        raise StartupError(f"cannot reach the model registry: {error}") from None
    except RegistryError as error:
        raise StartupError(f"cannot get model {settings.version!r} from the registry ({connection.where()}): {error}") from None
    target = settings.model_store / ARCHIVE_FILE
    if path != target:
        path.replace(target)
    named = f" ({settings.version})" if settings.version != version.version else ""
    return target, f"registry version {version.version}{named}, sha256 {version.short_sha256} checked", version.version


def fetch_from_image(settings: Settings) -> tuple[Path, str, None]:
    """Copy the archive built into the image into the (writable) model store; its version is its own."""
    if not settings.archive.is_file():
        raise StartupError(
            f"MODEL_SOURCE=image but {settings.archive} does not exist: this image was built without a model "
            "(build the with-model target: make image-with-model), or set MODEL_SOURCE=registry"
        )
    target = settings.model_store / ARCHIVE_FILE
    staging = target.with_name(f".{ARCHIVE_FILE}.copy")
    shutil.copyfile(settings.archive, staging)
    staging.replace(target)
    return target, f"built into the image ({settings.archive})", None


def check_archive(path: Path) -> str:
    """A readable .mar: every member passes its CRC check, the manifest names a model file that is there.
    Returns the archive's model version. TorchServe itself would start without a model it cannot load."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            if damaged:
                raise StartupError(f"model archive {path} is damaged: {damaged} fails its CRC check; publish or build it again")
            names = set(archive.namelist())
            if MANIFEST not in names:
                raise StartupError(f"model archive {path} has no {MANIFEST}; build it with torch-model-archiver (make archive)")
            model = json.loads(archive.read(MANIFEST)).get("model", {})
            serialized = model.get("serializedFile")
            if serialized and serialized not in names:
                raise StartupError(f"model archive {path} lacks {serialized}, the model file its manifest names; build it again (make archive)")
            return str(model.get("modelVersion", "?"))
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise StartupError(f"model archive {path} is damaged, not a readable zip ({error}); publish or build it again") from None
    except (ValueError, AttributeError) as error:
        raise StartupError(f"model archive {path}: its {MANIFEST} is not the JSON object torch-model-archiver writes ({error})") from None


# --- TorchServe -----------------------------------------------------------------------------------

def properties(text: str) -> dict[str, str]:
    """key=value lines of a .properties file (the last one wins, as in Java); comments skipped."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


def run_config(settings: Settings) -> tuple[str, dict[str, str]]:
    """The config TorchServe runs with: the given file plus number_of_gpu and the metrics. Refuses a management API off loopback."""
    try:
        text = settings.config.read_text()
    except OSError as error:
        raise StartupError(f"TORCHSERVE_CONFIG={settings.config}: cannot read it ({error.strerror})") from None
    text += f"\n# Added by docker/entrypoint.py from NUMBER_OF_GPU (TorchServe uses at most the GPUs it finds).\nnumber_of_gpu={settings.gpus}\n"
    text = run_properties(text)
    props = properties(text)
    management = props.get("management_address", "http://127.0.0.1:8081")
    host = re.sub(r"^https?://", "", management).rsplit(":", 1)[0]
    if host not in LOOPBACK:
        raise StartupError(
            f"{settings.config}: management_address={management}; refusing to start: the management API can load "
            "arbitrary code (CVE-2023-43654) and must listen on 127.0.0.1 only"
        )
    if not re.search(r":\d+$", props.get("inference_address", "")):
        raise StartupError(f"{settings.config}: no inference_address=http://HOST:PORT")
    return text, props


def java_command(props: dict[str, str], config: Path, settings: Settings) -> list[str]:
    """The command TorchServe's launcher (ts/model_server.py) builds for `torchserve --start --foreground`.
    The launcher itself is not used: it neither forwards SIGTERM to Java nor passes on its exit code."""
    import ts  # the frontend's jars live inside the Python package

    home = Path(ts.__file__).resolve().parent.parent
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else (shutil.which("java") or "java")
    vmargs = [arg for arg in props.get("vmargs", "").split() if not arg.startswith("-Dlog4j.configurationFile=")]
    return [
        java, f"-Dmodel_server_home={home}", f"-Dlog4j.configurationFile=file://{LOG_CONFIG}",
        f"-Djava.io.tmpdir={settings.tmp_dir}", *vmargs,
        "-cp", f".:{home / 'ts' / 'frontend' / '*'}", "org.pytorch.serve.ModelServer",
        "--python", sys.executable, "-f", str(config), "-s", str(settings.model_store), "-ncs",
        "-m", f"{MODEL_NAME}={ARCHIVE_FILE}",
    ]


def java_environment(settings: Settings, served: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        **served,  # which model this is, for the handler's answers, headers and metric
        "LOG_LOCATION": str(settings.log_dir),  # handler/log4j2.xml writes its files there
        "METRICS_LOCATION": str(settings.log_dir),
        "TEMP": str(settings.tmp_dir),
        "TMPDIR": str(settings.tmp_dir),
        # One intra-op thread per worker (handler/server.py does the same): the workers share the cores.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


class Supervisor:
    """TorchServe as this process's child: started, watched, stopped; every exited child reaped (as PID 1
    this process inherits orphans, such as workers left behind by a killed frontend)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.code: int | None = None
        self.stop_requested = False
        self.stop_deadline: float | None = None

    def start(self, command: list[str], environment: dict[str, str]) -> None:
        # Its own process group: whatever the frontend leaves behind can be killed with it at the end.
        self.process = subprocess.Popen(command, env=environment, cwd=self.settings.tmp_dir, stdin=subprocess.DEVNULL, start_new_session=True)

    def signal(self, signum: int) -> None:
        """Forward a stop signal to TorchServe (its shutdown hook stops the workers); kill it if it outlasts STOP_TIMEOUT."""
        if self.process is None:
            raise Stopped(signum)
        if self.code is None:
            print(f"entrypoint: {signal.Signals(signum).name}: stopping TorchServe", file=sys.stderr, flush=True)
            self.settings.ready_file.unlink(missing_ok=True)
            os.kill(self.process.pid, signum)
            if not self.stop_requested:
                self.stop_requested = True
                self.stop_deadline = time.monotonic() + self.settings.stop_timeout

    def reap(self) -> int | None:
        """Collect exited children; TorchServe's exit code (128 + signal when killed) once it has exited."""
        while self.code is None:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if self.process and pid == self.process.pid:
                code = os.waitstatus_to_exitcode(status)
                self.code = 128 - code if code < 0 else code
                self.process.returncode = self.code
        if self.stop_deadline is not None and self.code is None and time.monotonic() > self.stop_deadline:
            print(f"entrypoint: TorchServe still running {self.settings.stop_timeout:.0f} s after the stop signal; killing it", file=sys.stderr, flush=True)
            self.kill_group(signal.SIGKILL)
            self.stop_deadline = None
        return self.code

    def kill_group(self, signum: int) -> None:
        if self.process:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def wait(self) -> int:
        while self.reap() is None:
            time.sleep(POLL_S)
        self.kill_group(signal.SIGKILL)  # workers outliving a frontend that died
        return self.code

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns TorchServe's exit code."""
        if self.process and self.code is None:
            self.signal(signal.SIGTERM)
        return self.wait()


def answers(port: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """HTTP status and body from 127.0.0.1:port; status 0 when nothing answers."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()
    except (OSError, ValueError):
        return 0, b""


LOAD_FAILURES = 3  # workers that failed to load the model before the start is given up


def load_failures(log_dir: Path) -> tuple[int, str]:
    """How often a worker failed to load the model so far, and the last reason (from TorchServe's model log).
    TorchServe itself restarts such a worker forever, with a growing pause."""
    try:
        text = (log_dir / "model_log.log").read_text(errors="replace")
    except OSError:
        return 0, ""
    # The worker logs the handler's exception, then dies ("Backend worker process died.", and a traceback whose
    # last "SomethingError: ..." line says why when the first line is not there).
    loading = re.findall(r"Failed to load model \S+, exception (.*)", text)
    died = text.count("Backend worker process died.")
    errors = re.findall(r"MODEL_LOG - (\w+(?:Error|Exception): .*)$", text, re.MULTILINE)
    reason = loading[-1] if loading else errors[-1] if errors else "the worker process died"
    first_sentence = " ".join(reason.split()).split(". ")[0]  # torch's own errors go on for a paragraph
    return max(len(loading), died), first_sentence[:300]


def wait_until_ready(supervisor: Supervisor, port: int) -> bool:
    """Until the model answers a prediction (True), TorchServe exits or is told to stop (False).

    /ping alone is not enough: TorchServe reports Healthy when every *registered* model has its workers,
    so a model that failed to register leaves a server that pings Healthy and answers 404. A model its
    workers cannot load is given up after LOAD_FAILURES tries, not after READY_TIMEOUT."""
    settings = supervisor.settings
    deadline = time.monotonic() + settings.ready_timeout
    while supervisor.reap() is None and not supervisor.stop_requested:
        failures, reason = load_failures(settings.log_dir)
        if failures >= LOAD_FAILURES:
            raise StartupError(f"the model does not load: {failures} workers failed to load {ARCHIVE_FILE}: {reason}")
        status, _ = answers(port, "/ping")
        if status == 200:
            status, body = answers(port, f"/predictions/{MODEL_NAME}", PROBE)
            if status == 200:
                return True
            if status == 404:
                raise StartupError(f"TorchServe started without the model: it could not register {ARCHIVE_FILE}{log_tail(settings.log_dir)}")
        if time.monotonic() > deadline:
            raise StartupError(f"the model did not answer a prediction within READY_TIMEOUT={settings.ready_timeout:.0f} s{log_tail(settings.log_dir)}")
        time.sleep(POLL_S)
    return False


def writable(directory: Path) -> None:
    """The directory exists and this user can write to it, or one StartupError that says how to fix it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as error:
        owner = f"owned by uid {directory.stat().st_uid}, " if directory.exists() else ""
        raise StartupError(
            f"{directory} is not writable for uid {os.getuid()} ({owner}{error.strerror}); mount it writable for this user, "
            f"e.g. docker run --tmpfs {directory}:uid={os.getuid()},gid={os.getgid()} (the chart mounts an emptyDir with fsGroup)"
        ) from None


def devices(log_dir: Path) -> str:
    """Where the workers loaded the model, from the handler's "loaded ... on DEVICE" lines in TorchServe's model log."""
    try:
        text = (log_dir / "model_log.log").read_text(errors="replace")
    except OSError:
        text = ""
    found = sorted(set(re.findall(r"MODEL_LOG - loaded \S+ on (\S+?),", text)))
    return ", ".join(found) or "a device not named in its log"


def report(message: str, termination_log: Path) -> None:
    """The failure, once: on stderr and where Kubernetes reads the pod's termination message."""
    print(f"entrypoint: error: {message}", file=sys.stderr, flush=True)
    try:
        termination_log.write_bytes(message.encode()[:MESSAGE_LIMIT])
    except OSError:
        pass  # not in Kubernetes (the file is its mount)


def main() -> int:
    supervisor: Supervisor | None = None
    stopped_early: int | None = None  # a stop signal that came before TorchServe ran

    def on_signal(signum, _frame):
        nonlocal stopped_early
        if supervisor is None:
            # Raised wherever the main thread is; code in between (the database driver) may turn it into
            # an error of its own, so the signal is remembered as well.
            stopped_early = signum
            raise Stopped(signum)
        supervisor.signal(signum)

    # PID 1 gets no default signal handling: without these, SIGTERM would be ignored.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    termination_log = Path(os.environ.get("TERMINATION_LOG", "").strip() or "/dev/termination-log")
    try:
        settings = settings_from(os.environ)
        termination_log = settings.termination_log
        for directory in (settings.model_store, settings.log_dir, settings.tmp_dir):
            writable(directory)
        # A restarted container keeps its emptyDirs: an old marker would pass the startup probe at once.
        settings.ready_file.unlink(missing_ok=True)
        wanted = f"{settings.version} from the registry" if settings.source == "registry" else f"from {settings.archive}"
        print(f"entrypoint: getting model {wanted}", file=sys.stderr, flush=True)
        archive, origin, registry_version = (fetch_from_registry if settings.source == "registry" else fetch_from_image)(settings)
        model_version = check_archive(archive)
        text, props = run_config(settings)
        config = settings.tmp_dir / "config.properties"
        config.write_text(text)
        port = int(props["inference_address"].rsplit(":", 1)[1])
        supervisor = Supervisor(settings)
        supervisor.start(java_command(props, config, settings), java_environment(settings, served_model_environment(archive, registry_version)))
        print(f"entrypoint: TorchServe started (pid {supervisor.process.pid}): model {MODEL_NAME} {model_version}, {origin}; "
              f"number_of_gpu={settings.gpus}", file=sys.stderr, flush=True)
        if wait_until_ready(supervisor, port):
            settings.ready_file.write_text(f"{MODEL_NAME} {model_version} answered\n")
            print(f"entrypoint: ready: POST http://<pod>:{port}/predictions/{MODEL_NAME} (model on {devices(settings.log_dir)})",
                  file=sys.stderr, flush=True)
        code = supervisor.wait()
        if code != 0 and not (supervisor.stop_requested and signal_stopped(code)):
            report(f"TorchServe exited with code {code}{log_tail(settings.log_dir)}", termination_log)
        else:
            print(f"entrypoint: TorchServe exited with code {code}", file=sys.stderr, flush=True)
        return code
    except (Stopped, StartupError) as error:
        if stopped_early is not None:
            return stopped_before_start(stopped_early)
        report(str(error), termination_log)
        if supervisor:
            supervisor.stop()
        return 1
    except Exception:
        if stopped_early is None:
            raise  # a bug: the traceback goes to the log, which Kubernetes shows (FallbackToLogsOnError)
        return stopped_before_start(stopped_early)


def stopped_before_start(signum: int) -> int:
    print(f"entrypoint: {signal.Signals(signum).name}: stopped before TorchServe started", file=sys.stderr, flush=True)
    return 128 + signum


def signal_stopped(code: int) -> bool:
    """Exit codes of a JVM that ran its shutdown hooks for SIGTERM or SIGINT."""
    return code in (128 + signal.SIGTERM, 128 + signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
