"""A database that is not there: a clear one-line error within seconds and a non-zero exit."""

from __future__ import annotations

import socket
import time
from dataclasses import replace

import pytest
from conftest import LOCAL_ENV, run_cli

from registry import db
from registry.settings import cassandra_settings

pytestmark = pytest.mark.cassandra

PROMPT_S = 5.0  # the bound for "a clear error", beyond the process's own start-up


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on: bound once by us, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_connect_to_a_closed_port_fails_fast_with_the_address(closed_port):
    settings = replace(cassandra_settings({}), port=closed_port)
    started = time.perf_counter()
    with pytest.raises(
        db.DatabaseError, match=f"cannot connect to Cassandra at 127.0.0.1:{closed_port}.*scripts/cassandra.sh up"
    ):
        with db.connect(settings):
            pass
    assert time.perf_counter() - started < PROMPT_S


def startup_seconds(module: str) -> float:
    """How long `python -m MODULE --help` takes now (`training` imports torch): its start-up on this machine at
    its present load, before it could try to connect."""
    started = time.perf_counter()
    run_cli(LOCAL_ENV, module, "--help", timeout=120)
    return time.perf_counter() - started


@pytest.mark.parametrize(
    "command",
    [
        ("training", "load-data", "--limit", "10"),
        ("training", "train", "--source", "cassandra", "--epochs", "1"),
        ("training", "predict-table"),
        ("registry.cli", "list"),
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_commands_report_a_database_that_is_down_in_one_line(closed_port, command):
    allowed = PROMPT_S + startup_seconds(command[0])
    env = {**LOCAL_ENV, "CASSANDRA_PORT": str(closed_port), "CASSANDRA_KEYSPACE": "never_created"}
    started = time.perf_counter()
    result = run_cli(env, *command, timeout=60)
    seconds = time.perf_counter() - started
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"error: cannot connect to Cassandra at 127.0.0.1:{closed_port}, keyspace never_created"
    )
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert seconds < allowed, f"{seconds:.1f} s"


def test_bad_settings_are_one_line_errors_too():
    result = run_cli({**LOCAL_ENV, "CASSANDRA_PORT": "nine"}, "registry.cli", "list", timeout=60)
    assert result.returncode == 1
    assert result.stderr == "error: CASSANDRA_PORT='nine' is not a positive whole number\n"
