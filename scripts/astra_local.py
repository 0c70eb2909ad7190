#!/usr/bin/env python3
"""A local stand-in for DataStax Astra DB's connection path, made of real parts. It is not Astra: it speaks to a
driver what Astra speaks, so the project's Astra code runs for real on this machine.

What a driver meets, on 127.0.0.1:
  - a secure connect bundle zip laid out like Astra's (config.json naming the metadata service, ca.crt, and the
    client certificate and key), with a CA and certificates made anew at every `up` (openssl);
  - the metadata service (HTTPS, client certificate required) answering /metadata with the SNI proxy's address
    and the node's host id, and the SNI proxy that passes TLS through to the node its server name (the host id)
    names: both HAProxy, from Debian's package;
  - a Cassandra 5.0 node (scripts/cassandra.sh, a node of its own) that takes only TLS with a client
    certificate, and only logins (PasswordAuthenticator, CassandraAuthorizer);
  - roles as production uses them: mnist_writer (all permissions on the keyspaces: training, publishing) and
    mnist_reader (SELECT only: serving), and the login `token` holding one of the two, whose password is the
    current token (the driver logs in as `token` with the token as password, as on Astra).

  scripts/astra_local.py up [--keyspace mnist]        start it; prints the variables that point the project at it
  scripts/astra_local.py token --role reader|writer   issue a new token for that role; the old one stops working
  scripts/astra_local.py env [--direct --role ROLE]   print the variables again (--direct: the node itself, with
                                                      TLS and a login, as a self-hosted cluster is reached)
  scripts/astra_local.py down                         stop the proxy and the node

The project is pointed at it only as a user points it at Astra (ASTRA_DB_SECURE_BUNDLE, ASTRA_DB_TOKEN_FILE), or
at a self-hosted node with TLS and a login (CASSANDRA_HOSTS, CASSANDRA_PORT, CASSANDRA_USERNAME,
CASSANDRA_PASSWORD_FILE, CASSANDRA_TLS_CA_FILE, CASSANDRA_TLS_CERT_FILE, CASSANDRA_TLS_KEY_FILE). Tokens and
passwords are files (mode 0600) under the cache; none is ever printed or put on a command line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import string
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cassandra_node import CassandraNode  # noqa: E402

from registry import db  # noqa: E402
from registry.settings import CassandraSettings  # noqa: E402
from training.config import cache_dir  # noqa: E402

HAPROXY_PACKAGE = "haproxy=2.6.12-1+deb12u*"  # Debian 12's release, with its security updates
HOST = "127.0.0.1"
NODE_PORT, STORAGE_PORT, JMX_PORT = 9342, 7300, 7399  # beside the shared node (9042) and make soak's (9142)
SNI_PORT, METADATA_PORT = 29042, 29080  # Astra's own ports for the two
LOCAL_DC = "datacenter1"  # SimpleSnitch's data centre
ROLES = ("writer", "reader")
GRANTS = {"writer": "ALL PERMISSIONS", "reader": "SELECT"}  # on ALL KEYSPACES, as an Astra role holds the database
CACHE_S = 1  # how long the node caches logins and permissions


class StandInError(RuntimeError):
    """The stand-in could not be started or used; the message says what failed and where its log is."""


class Paths:
    """Everything of the stand-in under one folder of the cache."""

    def __init__(self, home: Path):
        self.home = home
        self.pki = home / "pki"  # the CA, the node's, proxy's and client's certificates, the superuser's password
        self.bundle = home / "secure-connect-local.zip"
        self.token = home / "token"
        self.metadata = home / "metadata.json"
        self.haproxy_config = home / "haproxy.cfg"
        self.haproxy_pid = home / "haproxy.pid"

    def file(self, name: str) -> Path:
        return self.pki / name

    def password(self, role: str) -> Path:
        return self.home / f"mnist_{role}.password"


def paths() -> Paths:
    return Paths(cache_dir() / "astra-local")


def node(where: Paths) -> CassandraNode:
    """The stand-in's Cassandra node: TLS with client certificates only, and logins."""
    return CassandraNode(
        port=NODE_PORT,
        storage_port=STORAGE_PORT,
        jmx_port=JMX_PORT,
        home=where.home / "node",
        extra={
            "CASSANDRA_CONF_EXTRA": str(where.home / "cassandra-security.yaml"),
            "CASSANDRA_TLS_CA_FILE": str(where.file("ca.crt")),
            "CASSANDRA_TLS_CERT_FILE": str(where.file("client.crt")),
            "CASSANDRA_TLS_KEY_FILE": str(where.file("client.key")),
            # The default superuser is made at once instead of after 10 s.
            "CASSANDRA_JVM_OPTS": "-Dcassandra.superuser_setup_delay_ms=0",
            # 512m ran out of heap taking a 96 MiB archive over TLS (make soak's plain-text node takes 32 MiB in 512m).
            "CASSANDRA_HEAP": "1g",
        },
    )


def security_settings(where: Paths) -> str:
    return f"""\
authenticator:
  class_name: PasswordAuthenticator
authorizer:
  class_name: CassandraAuthorizer
role_manager:
  class_name: CassandraRoleManager
# Cached for a second, not Cassandra's 2 s: a new token counts sooner (issue_token waits that out). No cache at all
# made every statement of a batch read the role tables, and a loaded machine's writes timed out.
roles_validity: {CACHE_S}s
permissions_validity: {CACHE_S}s
credentials_validity: {CACHE_S}s
client_encryption_options:
  enabled: true
  optional: false
  ssl_context_factory:
    class_name: org.apache.cassandra.security.PEMBasedSslContextFactory
  keystore: {where.file("node.pem")}
  truststore: {where.file("ca.crt")}
  require_client_auth: true
"""


# --- certificates ----------------------------------------------------------------------------------


def openssl(folder: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise StandInError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def make_certificates(folder: Path, names: dict[str, str]) -> None:
    """A CA (ca.crt, ca.key) and, for each NAME -> subjectAltName (or ""), NAME.crt and NAME.key (PKCS#8, as
    Cassandra's PEM keystore wants) signed by it; EC P-256 keys, valid for 30 days."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl(
        folder,
        "req",
        "-x509",
        *key,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "30",
        "-subj",
        "/O=mnist-serve/CN=astra-local CA (not Astra)",
    )
    for name, alt in names.items():
        openssl(
            folder, "req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/O=mnist-serve/CN={name}"
        )
        (folder / f"{name}.ext").write_text(f"subjectAltName={alt}\n" if alt else "basicConstraints=CA:FALSE\n")
        openssl(
            folder,
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "30",
            "-extfile",
            f"{name}.ext",
        )
    for private in folder.glob("*.key"):
        private.chmod(0o600)


def write_private(path: Path, text: str) -> None:
    """A file only this user can read, written whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    staging.chmod(0o600)
    staging.replace(path)


def write_bundle(
    where: Paths, keyspace: str, target: Path, client: str = "client", metadata_port: int = METADATA_PORT
) -> Path:
    """A secure connect bundle laid out like Astra's, with the client certificate CLIENT.crt/.key of pki/."""
    config = {"host": HOST, "port": metadata_port, "keyspace": keyspace, "localDC": LOCAL_DC}
    with zipfile.ZipFile(target, "w") as bundle:
        bundle.writestr("config.json", json.dumps(config, indent=2))
        bundle.write(where.file("ca.crt"), "ca.crt")
        bundle.write(where.file(f"{client}.crt"), "cert")
        bundle.write(where.file(f"{client}.key"), "key")
    target.chmod(0o600)
    return target


# --- the node and its roles --------------------------------------------------------------------------


def login(where: Paths, username: str, password: str) -> CassandraSettings:
    """Settings for the node itself, with TLS and the client certificate."""
    return CassandraSettings(
        hosts=(HOST,),
        port=NODE_PORT,
        username=username,
        password=password,
        tls_ca=where.file("ca.crt"),
        tls_cert=where.file("client.crt"),
        tls_key=where.file("client.key"),
    )


def as_superuser(where: Paths, statements: list[str], wait_s: float = 60) -> list:
    """Run statements as the superuser (the default cassandra/cassandra until `up` changes its password); the
    rows of each. The login is retried while the node is still making its default superuser."""
    from cassandra.cluster import Cluster

    password_file = where.file("superuser.password")
    password = password_file.read_text() if password_file.exists() else "cassandra"
    deadline = time.monotonic() + wait_s
    while True:
        cluster = Cluster(**db.cluster_kwargs(login(where, "cassandra", password)))
        try:
            session = cluster.connect()
            break
        except db.DRIVER_ERRORS as error:
            cluster.shutdown()
            if time.monotonic() > deadline:
                raise StandInError(f"the stand-in's node refused its superuser: {db.describe(error)}") from None
            time.sleep(1)
    try:
        return [list(session.execute(statement)) for statement in statements]
    except db.DRIVER_ERRORS as error:
        raise StandInError(f"the stand-in's node: {db.describe(error)}") from None
    finally:
        cluster.shutdown()


def new_token() -> str:
    """Shaped like Astra's: AstraCS:<client id>:<64 hex digits>."""
    client_id = "".join(secrets.choice(string.ascii_letters) for _ in range(24))
    return f"AstraCS:{client_id}:{secrets.token_hex(32)}"


def set_up_roles(where: Paths, keyspace: str) -> str:
    """The keyspace (made as Astra's console makes it), the two roles with passwords in files, the token's login
    holding the writer role, and a superuser password of its own; returns the node's host id."""
    superuser = secrets.token_urlsafe(24)
    passwords = {role: secrets.token_urlsafe(24) for role in ROLES}
    statements = [
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
        f"{{'class': 'SimpleStrategy', 'replication_factor': 1}}",
        *[f"CREATE ROLE mnist_{role} WITH LOGIN = true AND PASSWORD = '{passwords[role]}'" for role in ROLES],
        *[f"GRANT {GRANTS[role]} ON ALL KEYSPACES TO mnist_{role}" for role in ROLES],
        "SELECT host_id FROM system.local",
        f"ALTER ROLE cassandra WITH PASSWORD = '{superuser}'",
    ]
    rows = as_superuser(where, statements)
    write_private(where.file("superuser.password"), superuser)
    for role in ROLES:
        write_private(where.password(role), passwords[role])
    issue_token(where, "writer")
    return str(rows[-2][0][0])


def issue_token(where: Paths, role: str) -> None:
    """A new token for ROLE. The login `token` is made anew, because Cassandra grants the creator of a table every
    permission on it: a token that made the registry's tables would keep writing to them whatever its role."""
    token = new_token()
    as_superuser(
        where,
        [
            'DROP ROLE IF EXISTS "token"',
            f"CREATE ROLE \"token\" WITH LOGIN = true AND PASSWORD = '{token}'",
            f'GRANT mnist_{role} TO "token"',
        ],
    )
    time.sleep(CACHE_S + 0.5)  # until the node has forgotten the last token's login and permissions
    write_private(where.token, token)


# --- the proxy ---------------------------------------------------------------------------------------


def haproxy_config(where: Paths, host_id: str) -> str:
    return f"""\
# The stand-in's metadata service and SNI proxy (scripts/astra_local.py); 127.0.0.1 only.
global
    pidfile {where.haproxy_pid}
defaults
    timeout connect 5s
    # Longer than the driver's 30 s heartbeat on idle connections.
    timeout client 120s
    timeout server 120s

frontend cql_by_sni
    mode tcp
    bind {HOST}:{SNI_PORT}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend node if {{ req.ssl_sni -i {host_id} }}
    # A server name that is no node of this database: no backend, the connection is closed.

backend node
    mode tcp
    server node1 {HOST}:{NODE_PORT}

frontend metadata_service
    mode http
    bind {HOST}:{METADATA_PORT} ssl crt {where.file("proxy.pem")} ca-file {where.file("ca.crt")} verify required
    http-request return status 200 content-type application/json file {where.metadata} if {{ path /metadata }}
    http-request return status 404
"""


def haproxy_running(where: Paths) -> int | None:
    """The pid of the stand-in's HAProxy, if it runs (a pid file naming another program is not ours)."""
    try:
        pid = int(where.haproxy_pid.read_text().split()[0])
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(where.haproxy_config).encode() in command else None


def start_proxy(where: Paths) -> None:
    done = subprocess.run(
        [str(ROOT / "scripts" / "apt-install.sh"), "haproxy", HAPROXY_PACKAGE],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise StandInError(done.stderr.strip())
    check = subprocess.run(
        ["haproxy", "-c", "-q", "-f", str(where.haproxy_config)], capture_output=True, text=True, timeout=60
    )
    if check.returncode != 0:
        raise StandInError(f"HAProxy refuses {where.haproxy_config}: {check.stderr.strip()}")
    # -D: it goes to the background once it listens, so the ports answer when this returns.
    started = subprocess.run(
        ["haproxy", "-D", "-f", str(where.haproxy_config)], capture_output=True, text=True, timeout=60
    )
    if started.returncode != 0 or haproxy_running(where) is None:
        raise StandInError(f"HAProxy did not start: {started.stderr.strip()}")


def stop_proxy(where: Paths) -> None:
    pid = haproxy_running(where)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if haproxy_running(where) is None:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


# --- the commands --------------------------------------------------------------------------------------


def up(keyspace: str) -> Paths:
    where = paths()
    down(where)
    shutil.rmtree(
        where.pki, ignore_errors=True
    )  # the last run's certificates and superuser password went with its node
    make_certificates(
        where.pki, {"node": f"DNS:localhost,IP:{HOST}", "client": "", "proxy": f"DNS:localhost,IP:{HOST}"}
    )
    write_private(where.file("node.pem"), where.file("node.key").read_text() + where.file("node.crt").read_text())
    write_private(where.file("proxy.pem"), where.file("proxy.crt").read_text() + where.file("proxy.key").read_text())
    (where.home / "cassandra-security.yaml").write_text(security_settings(where))
    print(
        f"astra-local: starting the node on {HOST}:{NODE_PORT} (TLS with client certificates, logins only)",
        file=sys.stderr,
    )
    node(where).start_empty()
    host_id = set_up_roles(where, keyspace)
    metadata = {
        "version": 1,
        "region": "local",
        "contact_info": {
            "type": "sni_proxy",
            "local_dc": LOCAL_DC,
            "contact_points": [host_id],
            "sni_proxy_address": f"{HOST}:{SNI_PORT}",
        },
    }
    where.metadata.write_text(json.dumps(metadata))
    where.haproxy_config.write_text(haproxy_config(where, host_id))
    start_proxy(where)
    write_bundle(where, keyspace, where.bundle)
    print(
        f"astra-local: metadata service https://{HOST}:{METADATA_PORT}/metadata, SNI proxy {HOST}:{SNI_PORT} "
        f"-> node {host_id}; keyspace {keyspace}; a local stand-in for Astra's connection path, not Astra",
        file=sys.stderr,
    )
    return where


def down(where: Paths) -> None:
    stop_proxy(where)
    node(where).stop_and_forget()


def variables(where: Paths, keyspace: str, direct: bool = False, role: str = "writer") -> dict[str, str]:
    """What points the project at the stand-in: the bundle and token file, or (direct) the node with TLS and a login."""
    if not direct:
        return {
            "ASTRA_DB_SECURE_BUNDLE": str(where.bundle),
            "ASTRA_DB_TOKEN_FILE": str(where.token),
            "CASSANDRA_KEYSPACE": keyspace,
        }
    return {
        "CASSANDRA_HOSTS": HOST,
        "CASSANDRA_PORT": str(NODE_PORT),
        "CASSANDRA_KEYSPACE": keyspace,
        "CASSANDRA_USERNAME": f"mnist_{role}",
        "CASSANDRA_PASSWORD_FILE": str(where.password(role)),
        "CASSANDRA_TLS_CA_FILE": str(where.file("ca.crt")),
        "CASSANDRA_TLS_CERT_FILE": str(where.file("client.crt")),
        "CASSANDRA_TLS_KEY_FILE": str(where.file("client.key")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/astra_local.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start = commands.add_parser(
        "up", help="start the stand-in (new certificates, an empty node, roles, the proxy, the bundle)"
    )
    start.add_argument(
        "--keyspace", default="mnist", help="the keyspace to make, as Astra's console does (default: mnist)"
    )
    token = commands.add_parser("token", help="issue a new token holding ROLE; the previous token stops working")
    token.add_argument("--role", choices=ROLES, required=True)
    show = commands.add_parser("env", help="print the variables that point the project at the stand-in")
    show.add_argument("--keyspace", default="mnist")
    show.add_argument(
        "--direct", action="store_true", help="the node itself, with TLS and a login, instead of the bundle"
    )
    show.add_argument("--role", choices=ROLES, default="writer", help="with --direct: whose login (default: writer)")
    commands.add_parser("down", help="stop the proxy and the node, and forget the node's data")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            for name, value in variables(up(args.keyspace), args.keyspace).items():
                print(f"export {name}={value}")
        elif args.command == "token":
            issue_token(paths(), args.role)
            print(f"astra-local: a new token for mnist_{args.role} is in {paths().token}", file=sys.stderr)
        elif args.command == "env":
            for name, value in variables(paths(), args.keyspace, args.direct, args.role).items():
                print(f"export {name}={value}")
        else:
            down(paths())
    except (StandInError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
