"""A Cassandra node of its own beside the shared one, run by scripts/cassandra.sh: other ports, its own config,
data, logs and pid file under CACHE/NAME, the shared node's jars; the shared node on 9042 is never touched.
make soak restarts one under the registry; scripts/astra_local.py runs one with TLS and logins."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from training.config import cache_dir  # noqa: E402


@dataclass
class CassandraNode:
    port: int = 9142
    storage_port: int = 7100
    jmx_port: int = 7299
    home: Path = field(default_factory=lambda: cache_dir() / "scratch-node")
    # More of scripts/cassandra.sh's variables: CASSANDRA_CONF_EXTRA, CASSANDRA_TLS_*, CASSANDRA_JVM_OPTS.
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment of scripts/cassandra.sh for this node, and of a client of it (no Astra settings)."""
        local = {key: value for key, value in os.environ.items() if not key.startswith("ASTRA_DB_")}
        return {
            **local,
            "MNIST_SERVE_CACHE": str(self.home),
            "CASSANDRA_LIB": str(cache_dir() / "cassandra" / "lib"),
            "CASSANDRA_HEAP": "512m",  # a registry and a little data; the shared node keeps its 1g
            "CASSANDRA_HOSTS": "127.0.0.1",
            "CASSANDRA_PORT": str(self.port),
            "CASSANDRA_STORAGE_PORT": str(self.storage_port),
            "CASSANDRA_JMX_PORT": str(self.jmx_port),
            **self.extra,
        }

    @property
    def data(self) -> Path:
        return self.home / "cassandra" / "data"

    def script(self, command: str) -> float:
        """Run scripts/cassandra.sh COMMAND for this node; its seconds."""
        started = time.monotonic()
        done = subprocess.run(
            [str(ROOT / "scripts" / "cassandra.sh"), command], env=self.env, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise RuntimeError(f"scripts/cassandra.sh {command} (port {self.port}) failed:\n{done.stdout}{done.stderr}")
        return time.monotonic() - started

    def up(self) -> float:
        return self.script("up")

    def down(self) -> float:
        return self.script("down")

    def start_empty(self) -> float:
        """Stop one a killed run left behind, then start on empty data; its seconds."""
        self.down()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                raise RuntimeError(
                    f"127.0.0.1:{self.port} is taken by another program; the Cassandra node under {self.home} needs it"
                )
        shutil.rmtree(self.data, ignore_errors=True)
        return self.up()

    def stop_and_forget(self) -> None:
        self.down()
        shutil.rmtree(self.data, ignore_errors=True)


@contextmanager
def scratch_node() -> Iterator[CassandraNode]:
    """A node for fault runs, started on empty data; stopped and its data removed at the end."""
    node = CassandraNode()
    node.start_empty()
    try:
        yield node
    finally:
        node.stop_and_forget()
