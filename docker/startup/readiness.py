"""Whether TorchServe serves the model: asked until a prediction is answered, given up early when its workers
keep failing to load the model, and READY_FILE written for the chart's startup probe once it does."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from handler.server import MODEL_NAME, PROBE, log_tail
from startup.archive import ARCHIVE_FILE
from startup.report import StartupError, say
from startup.settings import Settings
from startup.supervisor import POLL_S, Supervisor

# Workers that failed to load the model before the start is given up: TorchServe itself restarts such a worker
# forever, with a growing pause, so READY_TIMEOUT would be the first to say so, minutes later.
LOAD_FAILURES = 3


def ask_over_http(port: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """HTTP status and body from 127.0.0.1:port (a POST when there is a body); status 0 when nothing answers."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()
    except (OSError, ValueError):
        return 0, b""


def model_log(log_dir: Path) -> str:
    """TorchServe's model log, where the workers' (and so the handler's) lines go; empty before it exists."""
    try:
        return (log_dir / "model_log.log").read_text(errors="replace")
    except OSError:
        return ""


def load_failures(log_dir: Path) -> tuple[int, str]:
    """How often a worker failed to load the model so far, and the last reason."""
    text = model_log(log_dir)
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
        status, _ = ask_over_http(port, "/ping")
        if status == 200:
            status, _ = ask_over_http(port, f"/predictions/{MODEL_NAME}", PROBE)
            if status == 200:
                return True
            if status == 404:
                raise StartupError(
                    f"TorchServe started without the model: it could not register "
                    f"{ARCHIVE_FILE}{log_tail(settings.log_dir)}"
                )
        if time.monotonic() > deadline:
            raise StartupError(
                f"the model did not answer a prediction within READY_TIMEOUT="
                f"{settings.ready_timeout:.0f} s{log_tail(settings.log_dir)}"
            )
        time.sleep(POLL_S)
    return False


def devices(log_dir: Path) -> str:
    """Where the workers loaded the model, from the handler's "loaded ... on DEVICE" lines in the model log."""
    found = sorted(set(re.findall(r"MODEL_LOG - loaded \S+ on (\S+?),", model_log(log_dir))))
    return ", ".join(found) or "a device not named in its log"


def mark_ready(settings: Settings, model_version: str, port: int) -> None:
    """READY_FILE, which the chart's startup probe checks, and the line that says where predictions go."""
    settings.ready_file.write_text(f"{MODEL_NAME} {model_version} answered\n")
    say(f"ready: POST http://<pod>:{port}/predictions/{MODEL_NAME} (model on {devices(settings.log_dir)})")
