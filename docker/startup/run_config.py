"""The config.properties TorchServe runs with: TORCHSERVE_CONFIG plus number_of_gpu and the project's metrics,
refused when its management API would listen beyond loopback; its inference API moved to a Unix socket, behind
nginx, which listens where inference_address said (handler/front.py)."""

from __future__ import annotations

import re
from pathlib import Path

from handler.front import behind_front
from handler.server import run_properties
from startup.report import StartupError
from startup.settings import Settings

LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}


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
    """The config's text and its properties. Refuses a management API off loopback: it can load arbitrary code."""
    try:
        text = settings.config.read_text()
    except OSError as error:
        raise StartupError(f"TORCHSERVE_CONFIG={settings.config}: cannot read it ({error.strerror})") from None
    text += (
        "\n# Added by docker/entrypoint.py from NUMBER_OF_GPU (TorchServe uses at most the GPUs it finds).\n"
        f"number_of_gpu={settings.gpus}\n"
    )
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


def write_run_config(settings: Settings, backend: Path) -> tuple[Path, dict[str, str], str]:
    """The run's config.properties, written to TMPDIR (the image's own is read-only), with the inference API on
    the Unix socket `backend`; its properties, and the HOST:PORT nginx listens on in front of it."""
    text, _ = run_config(settings)
    text, listen = behind_front(text, backend)
    config = settings.tmp_dir / "config.properties"
    config.write_text(text)
    return config, properties(text), listen


def port_of(address: str) -> int:
    """The port of http://HOST:PORT or HOST:PORT."""
    return int(address.rsplit(":", 1)[1])
