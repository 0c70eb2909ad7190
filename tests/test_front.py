"""handler/front.py without a server: where TorchServe's inference API goes behind nginx, and what is refused."""

import os
import stat
from pathlib import Path

import pytest

from handler.front import BACKEND_SOCKET_NAME, FrontError, backend_socket, behind_front, check_socket_path

PROPERTIES = "# settings\ninference_address=http://0.0.0.0:8080\nmanagement_address=http://127.0.0.1:8081\n"


def test_the_inference_api_moves_to_the_unix_socket_and_nginx_takes_its_address(tmp_path):
    socket = tmp_path / BACKEND_SOCKET_NAME
    moved, listen = behind_front(PROPERTIES, socket)
    assert listen == "0.0.0.0:8080"
    lines = moved.splitlines()
    # TorchServe 0.12 reads unix:/PATH as a domain socket (its Connector; use_native_io is on by default).
    assert [line for line in lines if line.startswith("inference_address=")] == [f"inference_address=unix:{socket}"]
    assert "management_address=http://127.0.0.1:8081" in lines


def test_the_socket_directory_is_this_users_alone(tmp_path):
    directory = tmp_path / "backend"
    directory.mkdir(mode=0o755)  # as a directory made earlier, or by a wide umask, would be
    socket = backend_socket(directory)
    assert socket == directory / BACKEND_SOCKET_NAME
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and directory.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(backend_socket(tmp_path / "made" / "here").parent.stat().st_mode) == 0o700


def test_a_socket_left_by_the_last_run_is_removed(tmp_path):
    """The container's TMPDIR outlives a restart of the container: the next TorchServe must be able to bind."""
    import socket as sockets

    left = tmp_path / "backend" / BACKEND_SOCKET_NAME
    left.parent.mkdir(mode=0o700)
    with sockets.socket(sockets.AF_UNIX) as listener:
        listener.bind(str(left))  # closed without unlink, as a killed server leaves it
    assert left.exists()
    assert backend_socket(left.parent) == left and not left.exists()
    with sockets.socket(sockets.AF_UNIX) as again:
        again.bind(str(left))


def test_socket_paths_nginx_or_the_kernel_would_not_take_are_refused(tmp_path):
    for path, reason in (
        ("relative/inference.sock", "absolute path"),
        ("/tmp/with space/inference.sock", "absolute path"),
        ("/tmp/semi;colon.sock", "absolute path"),
        ("/tmp/" + "d" * 100 + "/inference.sock", "longer than a Unix socket"),
    ):
        with pytest.raises(FrontError, match=reason):
            check_socket_path(Path(path))
    with pytest.raises(FrontError, match="absolute path"):
        behind_front(PROPERTIES, Path("inference.sock"))
