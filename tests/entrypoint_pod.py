"""docker/entrypoint.py as a pod runs it, on this machine: the pod's layout in a temporary directory, the image's
Python, the entrypoint as a child process with its output and every process under it, and a digit to send. The
fixtures `python` and `pod` are offered to every module by tests/conftest.py."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import LOCAL_ENV
from descendants import Descendants
from image_env import ROOT, image_venv

from handler.front import nginx_binary
from handler.server import Ports, config_with_ports

ENTRYPOINT = ROOT / "docker" / "entrypoint.py"
TEST_DIGIT = ROOT / "charts" / "mnist-serve" / "files" / "digit-7.json"  # the helm test's, as the API takes it
TEST_DIGIT_LABEL = 7
READY_S = 300.0  # JVM, two workers importing torch, warm-up; minutes on a busy 2-core machine


@pytest.fixture(scope="module")
def python() -> Path:
    return image_venv() / "bin" / "python"


@dataclass
class Pod:
    """A pod's layout in a temporary directory: the emptyDirs, the termination log, a read-only-in-spirit cwd and
    HOME."""

    root: Path
    ports: Ports
    environment: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def termination_message(self) -> str:
        log = self.path("termination-log")
        return log.read_text() if log.exists() else ""


@pytest.fixture
def pod(tmp_path) -> Pod:
    ports = Ports.free()
    config = tmp_path / "config.properties"
    config.write_text(config_with_ports(ports))
    for name in ("store", "logs", "tmp", "cwd", "home"):
        (tmp_path / name).mkdir()
    environment = {
        **LOCAL_ENV,  # no ASTRA_DB_* variables: the local node
        "MODEL_STORE": str(tmp_path / "store"),
        "LOG_DIR": str(tmp_path / "logs"),
        "TMPDIR": str(tmp_path / "tmp"),
        "TORCHSERVE_CONFIG": str(config),
        "TERMINATION_LOG": str(tmp_path / "termination-log"),
        "HOME": str(tmp_path / "home"),
        "READY_TIMEOUT": "240",
        "STOP_TIMEOUT": "20",
        "NGINX": nginx_binary(),  # as the image sets it
    }
    return Pod(tmp_path, ports, environment)


class Running:
    """The entrypoint as a child process, its output (TorchServe's console included) collected line by line."""

    def __init__(self, python: Path, pod: Pod, **settings: str):
        self.process = subprocess.Popen(
            [str(python), str(ENTRYPOINT)],
            cwd=pod.path("cwd"),
            env={**pod.environment, **settings},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()
        self.seen = Descendants(self.process.pid).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.process.poll() is None, (
                f"the entrypoint exited with {self.process.returncode}:\n{self.output[-4000:]}"
            )
            assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f} s:\n{self.output[-4000:]}"
            time.sleep(0.2)

    def finish(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.seen.stop()
        self.reader.join(10)
        return code

    def processes(self) -> list[psutil.Process]:
        """Every process that ran under the entrypoint so far: TorchServe's Java frontend and all it started."""
        return self.seen.everything()


def post_digit(port: int) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predictions/mnist",
        data=TEST_DIGIT.read_bytes(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)
