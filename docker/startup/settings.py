"""The serving container's settings, read from the environment (docker/entrypoint.py lists them) and checked:
a wrong one is refused with the variable's name and the fix, as is a directory this user cannot write to."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from registry.environment import SettingsError, number, text
from registry.names import VERSION_NAME
from startup.report import StartupError

APP = Path(__file__).resolve().parents[2]  # the repository, or /opt/mnist-serve in the image
SOURCES = ("registry", "image")


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
    try:
        return checked_settings(environ)
    except SettingsError as error:
        raise StartupError(str(error)) from None


def checked_settings(environ: Mapping[str, str]) -> Settings:
    source = text(environ, "MODEL_SOURCE", "registry")
    if source not in SOURCES:
        raise SettingsError(
            f"MODEL_SOURCE={source!r} is not one of {', '.join(SOURCES)} (registry: download "
            "MODEL_VERSION; image: the archive built into the image)"
        )
    version = text(environ, "MODEL_VERSION", "production")
    if not VERSION_NAME.fullmatch(version):
        raise SettingsError(
            f"MODEL_VERSION={version!r} is not a version or alias name (letters, digits, '.', '_', '-'; 64 at most)"
        )
    tmp_dir = Path(text(environ, "TMPDIR", tempfile.gettempdir()))
    return Settings(
        source=source,
        version=version,
        archive=Path(text(environ, "MODEL_ARCHIVE", "/opt/mnist-serve/model/mnist.mar")),
        model_store=Path(text(environ, "MODEL_STORE", "/home/model-server/model-store")),
        log_dir=Path(text(environ, "LOG_DIR", "/home/model-server/logs")),
        tmp_dir=tmp_dir,
        config=Path(text(environ, "TORCHSERVE_CONFIG", str(APP / "handler" / "config.properties"))),
        gpus=number(environ, "NUMBER_OF_GPU", 0, int, least=0),
        ready_timeout=number(environ, "READY_TIMEOUT", 300.0, least=1),
        ready_file=Path(text(environ, "READY_FILE", str(tmp_dir / "mnist-serve-ready"))),
        stop_timeout=number(environ, "STOP_TIMEOUT", 25.0, least=1),
        termination_log=termination_log_from(environ),
    )


def termination_log_from(environ: Mapping[str, str]) -> Path:
    """Where a failure is written: known before the other settings, so a wrong one can be reported there."""
    return Path(text(environ, "TERMINATION_LOG", "/dev/termination-log"))


def require_writable(directory: Path) -> None:
    """The directory exists and this user can write to it, or one StartupError that says how to fix it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as error:
        owner = f"owned by uid {directory.stat().st_uid}, " if directory.exists() else ""
        raise StartupError(
            f"{directory} is not writable for uid {os.getuid()} ({owner}{error.strerror}); mount it writable for this "
            f"user, e.g. docker run --tmpfs {directory}:uid={os.getuid()},gid={os.getgid()} (the chart mounts an "
            "emptyDir with fsGroup)"
        ) from None
