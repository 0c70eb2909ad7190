"""What the entrypoint tells: progress lines on stderr, and a failure once, also in the termination log that
Kubernetes shows in the pod's status."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from handler.server import log_tail

MESSAGE_LIMIT = 4096  # Kubernetes keeps at most this many bytes of a termination message


class StartupError(Exception):
    """The container cannot serve; the message says what was wrong and what to do."""


def say(message: str) -> None:
    print(f"entrypoint: {message}", file=sys.stderr, flush=True)


def report(message: str, termination_log: Path) -> None:
    """The failure, once: on stderr and where Kubernetes reads the pod's termination message."""
    say(f"error: {message}")
    try:
        termination_log.write_bytes(message.encode()[:MESSAGE_LIMIT])
    except OSError:
        pass  # not in Kubernetes (the file is its mount)


def report_exit(code: int, stop_requested: bool, log_dir: Path, termination_log: Path) -> int:
    """TorchServe's exit code, which becomes the container's; a failure unless TorchServe stopped as it was told."""
    if code != 0 and not (stop_requested and signal_stopped(code)):
        report(f"TorchServe exited with code {code}{log_tail(log_dir)}", termination_log)
    else:
        say(f"TorchServe exited with code {code}")
    return code


def signal_stopped(code: int) -> bool:
    """Exit codes of a JVM that ran its shutdown hooks for SIGTERM or SIGINT."""
    return code in (128 + signal.SIGTERM, 128 + signal.SIGINT)


def stopped_before_start(signum: int) -> int:
    say(f"{signal.Signals(signum).name}: stopped before TorchServe started")
    return 128 + signum
