"""The serving image's Python environment, made by docker/install.sh exactly as the Dockerfile's builder
stage makes it, on this machine (there is no Docker engine here). Built once per change of its inputs
and cached outside the checkout, like the reference model; older builds are removed (each is ~5 GB)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from training.config import cache_dir

ROOT = Path(__file__).resolve().parent.parent
INPUTS = (
    "docker/install.sh",
    "docker/requirements.txt",
    "docker/requirements-cuda.txt",
    "docker/requirements-train.txt",
)
# The interpreter the venv is made from: the one behind the project venv (Python 3.11, as in the image).
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)


def install_environment() -> dict[str, str]:
    """install.sh's environment: no CPU-only wheel index (this machine reaches only the default index)."""
    environment = {key: value for key, value in os.environ.items() if key != "TORCH_INDEX_URL"}
    return {**environment, "PYTHON": BASE_PYTHON}


KEEP = 2  # builds kept: this one and the one before (another checkout's test run may be using it)


def image_venv() -> Path:
    """The venv's directory; `bin/python` in it is the image's Python with the image's packages."""
    digest = hashlib.sha256(sys.version.encode())
    for name in INPUTS:
        digest.update((ROOT / name).read_bytes())
    parent = cache_dir() / "image-venv"
    prefix = parent / digest.hexdigest()[:16]
    parent.mkdir(parents=True, exist_ok=True)
    # Test runs of several people or checkouts share this cache: one builds, the others wait for it.
    with open(parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (prefix / ".complete").exists():
            build(prefix)
        (prefix / ".complete").touch()  # when it was last used
        builds = sorted(
            (p for p in parent.iterdir() if (p / ".complete").exists()), key=lambda p: (p / ".complete").stat().st_mtime
        )
        unfinished = [
            p for p in parent.iterdir() if p.is_dir() and not (p / ".complete").exists()
        ]  # none is building: we hold the lock
        for old in builds[:-KEEP] + unfinished:
            shutil.rmtree(old, ignore_errors=True)
    return prefix


def build(prefix: Path) -> None:
    shutil.rmtree(prefix, ignore_errors=True)  # an interrupted build
    done = subprocess.run(
        [str(ROOT / "docker" / "install.sh"), "python", "cpu", str(prefix), "--without-pip"],
        env=install_environment(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"docker/install.sh python cpu failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    (prefix / ".install.log").write_text(done.stdout + done.stderr)
    (prefix / ".complete").write_text("docker/install.sh python cpu PREFIX --without-pip\n")
