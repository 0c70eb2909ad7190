"""nginx in front of TorchServe's inference API (handler/nginx.conf says why): its configuration for one run, the
binary to run, and the command that runs it in the foreground. Used by `make serve` and the tests
(handler/server.py) and by the container's entrypoint (docker/startup/front.py)."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

HANDLER_DIR = Path(__file__).resolve().parent
TEMPLATE = HANDLER_DIR / "nginx.conf"
FETCH_SCRIPT = HANDLER_DIR.parent / "scripts" / "nginx.sh"  # in the checkout; the image sets NGINX instead
# nginx passes requests to TorchServe over a Unix socket, not loopback TCP: no TCP/IP stack on either side of the
# hop, for every request (TorchServe 0.12's frontend takes inference_address=unix:/PATH with its native epoll
# transport, use_native_io's default). sockaddr_un holds 108 bytes, the final NUL among them.
BACKEND_SOCKET_NAME = "inference.sock"
SOCKET_PATH_MAX = 107


class FrontError(RuntimeError):
    """nginx cannot be found, configured or started; the message says why."""


@dataclass(frozen=True)
class Limits:
    """What nginx admits; the defaults are sized for a 2-core pod with TorchServe's 256 MB of direct memory."""

    max_body_bytes: int = 1_048_576  # TorchServe's max_request_size (handler/config.properties)
    max_requests: int = 256  # in progress at once; each digit's body stays in a 128 kB buffer at most
    max_large: int = 8  # bodies of 100,000 bytes or more (or chunked) in progress at once
    client_timeout_s: int = 10  # a client silent this long, in its headers or its body, is dropped


def nginx_config(listen: str, backend: Path, run_dir: Path, allowed_origin: str = "", limits=Limits()) -> str:
    """handler/nginx.conf for one run: nginx on `listen` (HOST:PORT), TorchServe's inference API on the Unix
    socket `backend`, its files under run_dir, and the CORS header on nginx's own error answers when a page
    origin is allowed."""
    if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[\w.-]+):\d{1,5}", listen):
        raise FrontError(f"listen {listen!r}: expected HOST:PORT")
    check_socket_path(backend)
    cors = f"            add_header Access-Control-Allow-Origin {allowed_origin} always;\n" if allowed_origin else ""
    # Started by root, nginx would run its worker as nobody, which cannot write run_dir: keep root's user then.
    # (In the image it runs as uid 1000, and the line would only earn a warning.)
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    text = TEMPLATE.read_text()
    for name, value in (
        ("@LISTEN@", listen),
        ("@BACKEND_SOCKET@", str(backend)),
        ("@RUN_DIR@", str(run_dir)),
        ("@MAX_BODY_BYTES@", str(limits.max_body_bytes)),
        ("@MAX_REQUESTS@", str(limits.max_requests)),
        ("@MAX_LARGE@", str(limits.max_large)),
        ("@CLIENT_TIMEOUT_S@", str(limits.client_timeout_s)),
        ("@CORS@", cors),
        ("@USER@", user),
    ):
        text = text.replace(name, value)
    if re.search(r"@[A-Z_]+@", text):
        raise FrontError(f"{TEMPLATE}: a placeholder was left unfilled")
    return text


def nginx_binary() -> str:
    """$NGINX (the image's /usr/sbin/nginx), else the pinned one scripts/nginx.sh unpacks into the cache."""
    if os.environ.get("NGINX"):
        return os.environ["NGINX"]
    done = subprocess.run(["bash", str(FETCH_SCRIPT)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise FrontError(f"no nginx to put in front of TorchServe: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


def write_config(run_dir: Path, listen: str, backend: Path, allowed_origin: str = "") -> Path:
    """The run's nginx.conf and the directories it names, under run_dir."""
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (run_dir / name).mkdir(parents=True, exist_ok=True)
    config = run_dir / "nginx.conf"
    config.write_text(nginx_config(listen, backend, run_dir, allowed_origin))
    return config


def check_socket_path(path: Path) -> None:
    """An absolute path nginx's configuration and TorchServe's inference_address can both name as it is (no
    spaces, quotes or semicolons), short enough for a Unix socket's address (108 bytes with its final NUL)."""
    if not path.is_absolute() or not re.fullmatch(r"[\w./+-]+", str(path)):
        raise FrontError(f"{path}: the backend socket needs an absolute path of letters, digits and ./_+-")
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise FrontError(f"{path}: longer than a Unix socket's {SOCKET_PATH_MAX} bytes; use a shorter directory")


def backend_socket(directory: Path) -> Path:
    """Where TorchServe's inference API listens for nginx: a socket in `directory`, made (or tightened) to be
    this user's alone, so nothing else on the machine or in the pod can reach TorchServe around nginx."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_uid != os.geteuid():
        raise FrontError(f"{directory}: owned by uid {directory.stat().st_uid}, not by this user ({os.geteuid()})")
    directory.chmod(0o700)
    path = directory / BACKEND_SOCKET_NAME
    check_socket_path(path)
    # A socket left by the last run (the container's TMPDIR outlives a restart of it in the same pod) would make
    # TorchServe's bind fail with "address already in use".
    path.unlink(missing_ok=True)
    return path


def nginx_command(binary: str, config: Path) -> list[str]:
    """nginx in the foreground, with no file of its own outside the run's directory (-e: its error log before
    the configuration is read; -p: its prefix, where it would otherwise look for logs)."""
    return [binary, "-p", str(config.parent), "-e", "stderr", "-c", str(config), "-g", "daemon off;"]


def behind_front(properties: str, backend: Path) -> tuple[str, str]:
    """config.properties with TorchServe's inference API moved to the Unix socket `backend`, and the HOST:PORT
    its inference_address named, where nginx listens instead."""
    check_socket_path(backend)
    address = re.search(r"^inference_address=https?://(\S+:\d+)$", properties, flags=re.MULTILINE)
    if not address:
        raise FrontError("config.properties: expected one line inference_address=http://HOST:PORT")
    moved = (
        f"{properties[: address.start()]}# Moved by the launcher: nginx answers on {address[1]} "
        f"(handler/front.py).\ninference_address=unix:{backend}{properties[address.end() :]}"
    )
    return moved, address[1]
