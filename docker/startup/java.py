"""TorchServe's Java frontend as this container starts it: the command line `torchserve --start --foreground`
would run, and its environment."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from handler.server import LOG_CONFIG, MODEL_NAME
from startup.archive import ARCHIVE_FILE
from startup.settings import Settings


def java_command(props: dict[str, str], config: Path, settings: Settings) -> list[str]:
    """The command TorchServe's launcher (ts/model_server.py) builds for `torchserve --start --foreground`.
    The launcher itself is not used: it neither forwards SIGTERM to Java nor passes on its exit code."""
    import ts  # the frontend's jars live inside the Python package

    home = Path(ts.__file__).resolve().parent.parent
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else (shutil.which("java") or "java")
    vmargs = [arg for arg in props.get("vmargs", "").split() if not arg.startswith("-Dlog4j.configurationFile=")]
    return [
        java,
        f"-Dmodel_server_home={home}",
        f"-Dlog4j.configurationFile=file://{LOG_CONFIG}",
        f"-Djava.io.tmpdir={settings.tmp_dir}",
        *vmargs,
        "-cp",
        f".:{home / 'ts' / 'frontend' / '*'}",
        "org.pytorch.serve.ModelServer",
        "--python",
        sys.executable,
        "-f",
        str(config),
        "-s",
        str(settings.model_store),
        "-ncs",
        "-m",
        f"{MODEL_NAME}={ARCHIVE_FILE}",
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
