"""The database's connection settings, read from the environment in one place: a local or self-hosted
Cassandra node (optionally with TLS and a username), or DataStax Astra DB (secure connect bundle and token)."""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from registry.environment import SettingsError, number, text

# A node:        CASSANDRA_HOSTS (comma-separated, default 127.0.0.1), CASSANDRA_PORT (9042).
#   with a login:  CASSANDRA_USERNAME, and its password in CASSANDRA_PASSWORD or in a file named by
#                  CASSANDRA_PASSWORD_FILE (a mounted Secret).
#   with TLS:      CASSANDRA_TLS_CA_FILE (the CA that signed the nodes' certificates; setting it turns TLS
#                  on), CASSANDRA_TLS_CERT_FILE and CASSANDRA_TLS_KEY_FILE (a client certificate, for nodes
#                  that require one), CASSANDRA_TLS_VERIFY_HOSTNAME (true: the node's certificate must name
#                  the address connected to).
# Astra DB:      ASTRA_DB_SECURE_BUNDLE (path of the secure connect bundle zip) and the token in
#                ASTRA_DB_TOKEN or in a file named by ASTRA_DB_TOKEN_FILE (a mounted Secret); the bundle
#                carries the address and certificates, so hosts, port, login and TLS settings are not used.
# Both:          CASSANDRA_KEYSPACE (mnist), CASSANDRA_CONNECT_TIMEOUT (5 s),
#                CASSANDRA_REQUEST_TIMEOUT (30 s).

# For the commands' --help.
SETTINGS_HELP = (
    "Connection settings come from the environment: CASSANDRA_HOSTS (127.0.0.1), CASSANDRA_PORT (9042), "
    "CASSANDRA_KEYSPACE (mnist); a login with CASSANDRA_USERNAME and CASSANDRA_PASSWORD_FILE; TLS with "
    "CASSANDRA_TLS_CA_FILE (a client certificate: CASSANDRA_TLS_CERT_FILE, CASSANDRA_TLS_KEY_FILE); for Astra DB "
    "ASTRA_DB_SECURE_BUNDLE plus ASTRA_DB_TOKEN or ASTRA_DB_TOKEN_FILE."
)
KEYSPACE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")  # CQL's rule for unquoted keyspace names
BUNDLE_FILES = ("config.json", "ca.crt", "cert", "key")  # what the driver reads from a secure connect bundle
NOT_WITH_A_BUNDLE = ("CASSANDRA_USERNAME", "CASSANDRA_TLS_CA_FILE", "CASSANDRA_TLS_CERT_FILE", "CASSANDRA_TLS_KEY_FILE")


@dataclass(frozen=True)
class CassandraSettings:
    hosts: tuple[str, ...] = ("127.0.0.1",)
    port: int = 9042
    keyspace: str = "mnist"
    secure_bundle: Path | None = None  # set = Astra DB
    token: str | None = field(default=None, repr=False)  # repr=False: never in a log or traceback
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None  # set = TLS to the nodes
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_verify_hostname: bool = True
    connect_timeout: float = 5.0
    request_timeout: float = 30.0

    @property
    def astra(self) -> bool:
        return self.secure_bundle is not None

    def where(self) -> str:
        """Where the data lives, for messages (never the token or password)."""
        if self.astra:
            return f"Astra DB (bundle {self.secure_bundle}), keyspace {self.keyspace}"
        how = (["TLS"] if self.tls_ca else []) + ([f"user {self.username}"] if self.username else [])
        detail = f" ({', '.join(how)})" if how else ""
        return f"{','.join(self.hosts)}:{self.port}{detail}, keyspace {self.keyspace}"


def cassandra_settings(environ: Mapping[str, str] = os.environ) -> CassandraSettings:
    """The connection settings from the environment, checked; raises SettingsError."""
    defaults = CassandraSettings()

    def readable_file(name: str) -> Path | None:
        if not text(environ, name):
            return None
        path = Path(text(environ, name)).expanduser()
        if not path.is_file():
            raise SettingsError(f"{name}={text(environ, name)}: no such file")
        return path

    keyspace = keyspace_name(text(environ, "CASSANDRA_KEYSPACE", defaults.keyspace), "CASSANDRA_KEYSPACE=")
    hosts = tuple(host.strip() for host in text(environ, "CASSANDRA_HOSTS").split(",") if host.strip())
    port = number(environ, "CASSANDRA_PORT", defaults.port, int)
    if port > 65535:
        raise SettingsError(f"CASSANDRA_PORT={port} is not a port number (1..65535)")
    timeouts = {
        "connect_timeout": number(environ, "CASSANDRA_CONNECT_TIMEOUT", defaults.connect_timeout),
        "request_timeout": number(environ, "CASSANDRA_REQUEST_TIMEOUT", defaults.request_timeout),
    }

    if text(environ, "ASTRA_DB_SECURE_BUNDLE"):
        token = secret(
            environ,
            "ASTRA_DB_TOKEN",
            "the token",
            "ASTRA_DB_SECURE_BUNDLE is set but there is no token",
            "an application token from the Astra console",
        )
        both = [name for name in NOT_WITH_A_BUNDLE if text(environ, name)]
        if both:
            raise SettingsError(
                f"ASTRA_DB_SECURE_BUNDLE is set, and so is {both[0]}: the bundle brings Astra's address and "
                "certificates and the token is the password; unset one of the two"
            )
        bundle = checked_bundle(text(environ, "ASTRA_DB_SECURE_BUNDLE"))
        return CassandraSettings(
            hosts=hosts or defaults.hosts, port=port, keyspace=keyspace, secure_bundle=bundle, token=token, **timeouts
        )

    username = text(environ, "CASSANDRA_USERNAME") or None
    password = None
    if username:
        password = secret(
            environ,
            "CASSANDRA_PASSWORD",
            "the password",
            "CASSANDRA_USERNAME is set but there is no password",
            f"the password of the role {username}",
        )
    elif text(environ, "CASSANDRA_PASSWORD") or text(environ, "CASSANDRA_PASSWORD_FILE"):
        raise SettingsError(
            "a Cassandra password is set but CASSANDRA_USERNAME is not; set the role name it belongs to"
        )
    tls_ca, tls_cert, tls_key = (readable_file(f"CASSANDRA_TLS_{part}_FILE") for part in ("CA", "CERT", "KEY"))
    if bool(tls_cert) != bool(tls_key):
        raise SettingsError(
            "set both CASSANDRA_TLS_CERT_FILE and CASSANDRA_TLS_KEY_FILE (a client certificate and its key), or neither"
        )
    if tls_cert and not tls_ca:
        raise SettingsError(
            "CASSANDRA_TLS_CERT_FILE is set but CASSANDRA_TLS_CA_FILE is not; TLS needs the CA that signed the "
            "nodes' certificates"
        )
    verify = text(environ, "CASSANDRA_TLS_VERIFY_HOSTNAME").lower() or "true"
    if verify not in ("true", "false"):
        raise SettingsError(f"CASSANDRA_TLS_VERIFY_HOSTNAME={verify!r} is not true or false")
    return CassandraSettings(
        hosts=hosts or defaults.hosts,
        port=port,
        keyspace=keyspace,
        username=username,
        password=password,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_verify_hostname=verify == "true",
        **timeouts,
    )


def keyspace_name(text: str, given_as: str) -> str:
    """The name checked, because it is written into CQL statements (keyspaces cannot be bound)."""
    if not KEYSPACE_NAME.fullmatch(text):
        raise SettingsError(
            f"{given_as}{text!r} is not a keyspace name: use a letter, then letters, digits or _ (48 at most)"
        )
    return text


def secret(environ: Mapping[str, str], name: str, what: str, missing: str, hint: str) -> str:
    """A secret from the variable NAME or from the file NAME_FILE names (a mounted Secret); never echoed."""
    inline = text(environ, name)
    path = text(environ, f"{name}_FILE")
    if inline and path:
        raise SettingsError(f"both {name} and {name}_FILE are set; set only one")
    if path:
        try:
            inline = Path(path).expanduser().read_text().strip()
        except OSError as error:
            raise SettingsError(f"{name}_FILE={path}: cannot read it ({error.strerror})") from None
        if not inline:
            raise SettingsError(f"{name}_FILE={path} is empty; it should hold {what}")
    if not inline:
        raise SettingsError(f"{missing}: set {name}, or {name}_FILE to a file holding it ({hint})")
    return inline


def checked_bundle(text: str) -> Path:
    """The secure connect bundle, checked the way the driver will read it, so a wrong file is one clear line."""
    bundle = Path(text).expanduser()
    again = "download the secure connect bundle again from the Astra console (Connect tab)"
    if not bundle.is_file():
        raise SettingsError(f"ASTRA_DB_SECURE_BUNDLE={text}: no such file; {again} and point the variable at the zip")
    try:
        with zipfile.ZipFile(bundle) as archive:
            names = archive.namelist()
            config_text = archive.read("config.json") if "config.json" in names else b"{}"
    except (zipfile.BadZipFile, OSError) as error:
        raise SettingsError(f"ASTRA_DB_SECURE_BUNDLE={text} is not a zip file ({error}); {again}") from None
    missing = [name for name in BUNDLE_FILES if name not in names]
    if missing:
        raise SettingsError(
            f"ASTRA_DB_SECURE_BUNDLE={text} lacks {', '.join(missing)} (a secure connect bundle holds "
            f"{', '.join(BUNDLE_FILES)}); {again}"
        )
    try:
        config = json.loads(config_text)
    except ValueError as error:  # UnicodeDecodeError is one too
        raise SettingsError(f"ASTRA_DB_SECURE_BUNDLE={text}: its config.json is not JSON ({error}); {again}") from None
    if not isinstance(config, dict) or not config.get("host") or not config.get("port"):
        raise SettingsError(
            f"ASTRA_DB_SECURE_BUNDLE={text}: its config.json names no metadata service (host, port); {again}"
        )
    return bundle
