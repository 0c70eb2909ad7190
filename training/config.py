"""Every setting the package reads from the environment, with its default, in one place."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


def cache_dir() -> Path:
    """Downloads and builds live outside the checkout so a fresh clone reuses them."""
    return Path(os.environ.get("MNIST_SERVE_CACHE", Path.home() / ".cache" / "mnist-serve"))


# --- Cassandra / Astra DB ---------------------------------------------------------------------
# A local node:  CASSANDRA_HOSTS (comma-separated, default 127.0.0.1), CASSANDRA_PORT (9042).
# Astra DB:      ASTRA_DB_SECURE_BUNDLE (path of the secure connect bundle zip) and the token in
#                ASTRA_DB_TOKEN or in a file named by ASTRA_DB_TOKEN_FILE (a mounted Secret);
#                with a bundle set, hosts and port are ignored.
# Both:          CASSANDRA_KEYSPACE (mnist), CASSANDRA_CONNECT_TIMEOUT (5 s),
#                CASSANDRA_REQUEST_TIMEOUT (30 s).

KEYSPACE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")  # CQL's rule for unquoted keyspace names


class SettingsError(ValueError):
    """An environment variable holds something unusable; the message names it and the fix."""


@dataclass(frozen=True)
class CassandraSettings:
    hosts: tuple[str, ...] = ("127.0.0.1",)
    port: int = 9042
    keyspace: str = "mnist"
    secure_bundle: Path | None = None  # set = Astra DB
    token: str | None = field(default=None, repr=False)  # repr=False: never in a log or traceback
    connect_timeout: float = 5.0
    request_timeout: float = 30.0

    @property
    def astra(self) -> bool:
        return self.secure_bundle is not None

    def where(self) -> str:
        """Where the data lives, for messages (never the token)."""
        if self.astra:
            return f"Astra DB (bundle {self.secure_bundle}), keyspace {self.keyspace}"
        return f"{','.join(self.hosts)}:{self.port}, keyspace {self.keyspace}"


def cassandra_settings(environ: Mapping[str, str] = os.environ) -> CassandraSettings:
    """The connection settings from the environment, checked; raises SettingsError."""
    defaults = CassandraSettings()

    def number(name: str, default: float, kind: type = float):
        text = environ.get(name, "").strip()
        if not text:
            return default
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise SettingsError(f"{name}={text!r} is not a positive {'whole ' if kind is int else ''}number")
        return value

    keyspace = keyspace_name(environ.get("CASSANDRA_KEYSPACE", "").strip() or defaults.keyspace, "CASSANDRA_KEYSPACE=")
    hosts = tuple(host.strip() for host in environ.get("CASSANDRA_HOSTS", "").split(",") if host.strip())
    port = number("CASSANDRA_PORT", defaults.port, int)
    if port > 65535:
        raise SettingsError(f"CASSANDRA_PORT={port} is not a port number (1..65535)")
    bundle_text = environ.get("ASTRA_DB_SECURE_BUNDLE", "").strip()
    bundle = Path(bundle_text).expanduser() if bundle_text else None
    token = astra_token(environ) if bundle else None
    if bundle and not bundle.is_file():
        raise SettingsError(
            f"ASTRA_DB_SECURE_BUNDLE={bundle_text}: no such file; download the secure connect bundle "
            "from the Astra console (Connect tab) and point the variable at the zip"
        )
    return CassandraSettings(
        hosts=hosts or defaults.hosts,
        port=port,
        keyspace=keyspace,
        secure_bundle=bundle,
        token=token,
        connect_timeout=number("CASSANDRA_CONNECT_TIMEOUT", defaults.connect_timeout),
        request_timeout=number("CASSANDRA_REQUEST_TIMEOUT", defaults.request_timeout),
    )


def keyspace_name(text: str, given_as: str) -> str:
    """The name checked, because it is written into CQL statements (keyspaces cannot be bound)."""
    if not KEYSPACE_NAME.fullmatch(text):
        raise SettingsError(f"{given_as}{text!r} is not a keyspace name: use a letter, then letters, digits or _ (48 at most)")
    return text


def astra_token(environ: Mapping[str, str]) -> str:
    """The Astra application token, from ASTRA_DB_TOKEN or the file ASTRA_DB_TOKEN_FILE names."""
    inline = environ.get("ASTRA_DB_TOKEN", "").strip()
    token_file = environ.get("ASTRA_DB_TOKEN_FILE", "").strip()
    if inline and token_file:
        raise SettingsError("both ASTRA_DB_TOKEN and ASTRA_DB_TOKEN_FILE are set; set only one")
    if token_file:
        try:
            inline = Path(token_file).expanduser().read_text().strip()
        except OSError as error:
            raise SettingsError(f"ASTRA_DB_TOKEN_FILE={token_file}: cannot read it ({error.strerror})") from None
        if not inline:
            raise SettingsError(f"ASTRA_DB_TOKEN_FILE={token_file} is empty; it should hold the AstraCS:... token")
    if not inline:
        raise SettingsError(
            "ASTRA_DB_SECURE_BUNDLE is set but there is no token: set ASTRA_DB_TOKEN, or ASTRA_DB_TOKEN_FILE "
            "to a file holding it (an application token from the Astra console)"
        )
    return inline
