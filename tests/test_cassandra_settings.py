"""Connection settings, the Cluster arguments for a local node, a node with TLS and a login, and Astra, token
ranges: no database needed."""

from __future__ import annotations

import itertools
import json
import re
import ssl
import subprocess
import zipfile
from pathlib import Path

import pytest
from cassandra.auth import PlainTextAuthProvider

from registry import db
from registry.settings import CassandraSettings, SettingsError, cassandra_settings

TOKEN = "AstraCS:secret-token-value"


def bundle_zip(path: Path, leave_out: str = "", config: dict | None = None) -> Path:
    """A zip laid out like a secure connect bundle (the files are not real certificates)."""
    with zipfile.ZipFile(path, "w") as archive:
        files = {
            "config.json": json.dumps(config or {"host": "db.example", "port": 29080}),
            "ca.crt": "-",
            "cert": "-",
            "key": "-",
        }
        for name, text in files.items():
            if name != leave_out:
                archive.writestr(name, text)
    return path


def test_defaults_are_the_local_node():
    settings = cassandra_settings({})
    assert settings == CassandraSettings(hosts=("127.0.0.1",), port=9042, keyspace="mnist")
    assert not settings.astra


def test_local_settings_from_the_environment():
    settings = cassandra_settings(
        {"CASSANDRA_HOSTS": "10.0.0.1, 10.0.0.2", "CASSANDRA_PORT": "19042", "CASSANDRA_KEYSPACE": "digits"}
    )
    assert settings.hosts == ("10.0.0.1", "10.0.0.2")
    kwargs = db.cluster_kwargs(settings)
    assert kwargs["contact_points"] == ["10.0.0.1", "10.0.0.2"]
    assert kwargs["port"] == 19042
    assert "cloud" not in kwargs and "auth_provider" not in kwargs
    assert kwargs["connect_timeout"] == kwargs["control_connection_timeout"] == 5.0


def test_astra_settings_build_a_cloud_cluster_with_the_token(tmp_path):
    bundle = bundle_zip(tmp_path / "secure-connect-mnist.zip")
    settings = cassandra_settings(
        {"ASTRA_DB_SECURE_BUNDLE": str(bundle), "ASTRA_DB_TOKEN": TOKEN, "CASSANDRA_HOSTS": "ignored"}
    )
    assert settings.astra
    kwargs = db.cluster_kwargs(settings)
    # Unpacked in the temp directory: beside the bundle is a read-only Secret mount in a pod.
    assert kwargs["cloud"] == {
        "secure_connect_bundle": str(bundle),
        "use_default_tempdir": True,
        "connect_timeout": 5.0,
    }
    auth = kwargs["auth_provider"]
    assert isinstance(auth, PlainTextAuthProvider)
    assert (auth.username, auth.password) == ("token", TOKEN)
    # The driver refuses contact points together with a cloud config.
    assert "contact_points" not in kwargs and "port" not in kwargs


def test_astra_token_is_read_from_a_mounted_secret_file(tmp_path):
    bundle = bundle_zip(tmp_path / "bundle.zip")
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")  # Secrets created from files often end in a newline
    settings = cassandra_settings({"ASTRA_DB_SECURE_BUNDLE": str(bundle), "ASTRA_DB_TOKEN_FILE": str(secret)})
    assert settings.token == TOKEN


def test_the_token_never_appears_in_messages(tmp_path):
    bundle = bundle_zip(tmp_path / "bundle.zip")
    settings = cassandra_settings({"ASTRA_DB_SECURE_BUNDLE": str(bundle), "ASTRA_DB_TOKEN": TOKEN})
    assert TOKEN not in repr(settings)
    assert TOKEN not in settings.where()
    login = cassandra_settings({"CASSANDRA_USERNAME": "mnist_reader", "CASSANDRA_PASSWORD": TOKEN})
    assert TOKEN not in repr(login) and TOKEN not in login.where()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """A CA and a client certificate signed by it, from openssl (as a cluster's operator would make them)."""
    folder = tmp_path_factory.mktemp("pki")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=test CA",
        "-days",
        "1",
    )
    run(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=client",
    )
    run(
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.crt",
        "-days",
        "1",
    )
    return {name: folder / name for name in ("ca.crt", "client.crt", "client.key")}


def test_a_login_and_tls_build_an_auth_provider_and_a_verifying_context(certificates, tmp_path):
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    settings = cassandra_settings(
        {
            "CASSANDRA_HOSTS": "cassandra.db.svc",
            "CASSANDRA_USERNAME": "mnist_reader",
            "CASSANDRA_PASSWORD_FILE": str(password),
            "CASSANDRA_TLS_CA_FILE": str(certificates["ca.crt"]),
            "CASSANDRA_TLS_CERT_FILE": str(certificates["client.crt"]),
            "CASSANDRA_TLS_KEY_FILE": str(certificates["client.key"]),
        }
    )
    assert settings.where() == "cassandra.db.svc:9042 (TLS, user mnist_reader), keyspace mnist"
    kwargs = db.cluster_kwargs(settings)
    assert (kwargs["auth_provider"].username, kwargs["auth_provider"].password) == ("mnist_reader", "s3cret")
    context = kwargs["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname  # the node must prove its name
    unchecked = cassandra_settings(
        {"CASSANDRA_TLS_CA_FILE": str(certificates["ca.crt"]), "CASSANDRA_TLS_VERIFY_HOSTNAME": "false"}
    )
    assert not db.cluster_kwargs(unchecked)["ssl_context"].check_hostname
    assert "auth_provider" not in db.cluster_kwargs(unchecked)


def test_tls_files_that_cannot_be_used_are_one_database_error(certificates):
    swapped = cassandra_settings(
        {
            "CASSANDRA_TLS_CA_FILE": str(certificates["ca.crt"]),
            "CASSANDRA_TLS_CERT_FILE": str(certificates["client.key"]),
            "CASSANDRA_TLS_KEY_FILE": str(certificates["client.crt"]),
        }
    )
    with pytest.raises(db.DatabaseError, match=r"^the TLS files of CASSANDRA_TLS_\*_FILE cannot be used: "):
        db.cluster_kwargs(swapped)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"CASSANDRA_PORT": "nine"}, "CASSANDRA_PORT='nine' is not a positive whole number"),
        ({"CASSANDRA_PORT": "70000"}, "not a port number"),
        ({"CASSANDRA_KEYSPACE": "mnist; DROP"}, "is not a keyspace name"),
        ({"CASSANDRA_CONNECT_TIMEOUT": "-1"}, "CASSANDRA_CONNECT_TIMEOUT='-1' is not a positive number"),
        ({"ASTRA_DB_SECURE_BUNDLE": "/nonexistent/bundle.zip", "ASTRA_DB_TOKEN": TOKEN}, "no such file"),
        ({"ASTRA_DB_SECURE_BUNDLE": "/nonexistent/bundle.zip"}, "there is no token"),
        ({"ASTRA_DB_SECURE_BUNDLE": "b.zip", "ASTRA_DB_TOKEN": TOKEN, "ASTRA_DB_TOKEN_FILE": "t"}, "set only one"),
        ({"ASTRA_DB_SECURE_BUNDLE": "b.zip", "ASTRA_DB_TOKEN_FILE": "/nonexistent/token"}, "cannot read it"),
        (
            {"CASSANDRA_USERNAME": "mnist_reader"},
            "CASSANDRA_USERNAME is set but there is no password: set CASSANDRA_PASSWORD, or CASSANDRA_PASSWORD_FILE",
        ),
        ({"CASSANDRA_PASSWORD": "x"}, "a Cassandra password is set but CASSANDRA_USERNAME is not"),
        ({"CASSANDRA_TLS_CA_FILE": "/nonexistent/ca.crt"}, "CASSANDRA_TLS_CA_FILE=/nonexistent/ca.crt: no such file"),
        ({"CASSANDRA_TLS_CERT_FILE": "/etc/hostname"}, "set both CASSANDRA_TLS_CERT_FILE and CASSANDRA_TLS_KEY_FILE"),
        (
            {"CASSANDRA_TLS_CERT_FILE": "/etc/hostname", "CASSANDRA_TLS_KEY_FILE": "/etc/hostname"},
            "CASSANDRA_TLS_CA_FILE is not",
        ),
        ({"CASSANDRA_TLS_VERIFY_HOSTNAME": "maybe"}, "is not true or false"),
    ],
)
def test_unusable_settings_are_named(environ, message):
    with pytest.raises(SettingsError, match=message):
        cassandra_settings(environ)


@pytest.mark.parametrize(
    "leave_out, config, message",
    [
        ("ca.crt", None, "lacks ca.crt (a secure connect bundle holds config.json, ca.crt, cert, key)"),
        ("", {"host": "db.example"}, "its config.json names no metadata service"),
    ],
)
def test_a_bundle_that_the_driver_could_not_use_is_named(tmp_path, leave_out, config, message):
    bundle = bundle_zip(tmp_path / "bundle.zip", leave_out, config)
    with pytest.raises(SettingsError, match=re.escape(message)):
        cassandra_settings({"ASTRA_DB_SECURE_BUNDLE": str(bundle), "ASTRA_DB_TOKEN": TOKEN})


def test_a_bundle_that_is_not_a_zip_and_a_bundle_with_a_login_are_refused(tmp_path):
    text = tmp_path / "bundle.zip"
    text.write_text("<html>Sign in</html>")  # what a download through a login page saves
    with pytest.raises(SettingsError, match=rf"ASTRA_DB_SECURE_BUNDLE={text} is not a zip file"):
        cassandra_settings({"ASTRA_DB_SECURE_BUNDLE": str(text), "ASTRA_DB_TOKEN": TOKEN})
    bundle = bundle_zip(tmp_path / "real.zip")
    with pytest.raises(SettingsError, match="ASTRA_DB_SECURE_BUNDLE is set, and so is CASSANDRA_USERNAME"):
        cassandra_settings({"ASTRA_DB_SECURE_BUNDLE": str(bundle), "ASTRA_DB_TOKEN": TOKEN, "CASSANDRA_USERNAME": "u"})


@pytest.mark.parametrize("count", [1, 2, 3, 8, 32, 1000])
def test_token_ranges_cover_the_ring_once(count):
    ranges = db.token_ranges(count)
    assert len(ranges) == count
    assert ranges[0][0] == db.MIN_TOKEN and ranges[-1][1] == db.MAX_TOKEN
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end == start  # (a, b] then (b, c]: no gap, no overlap
    widths = [end - start for start, end in ranges]
    assert max(widths) - min(widths) <= count  # the remainder of the division lands in the last one


def test_token_ranges_need_at_least_one():
    with pytest.raises(ValueError):
        db.token_ranges(0)


def test_schema_file_splits_into_create_statements():
    statements = db.schema_statements(db.SCHEMA.read_text())
    assert statements and all(s.upper().startswith("CREATE TABLE IF NOT EXISTS") for s in statements)
    assert not any("--" in s for s in statements)
    tables = {s.split()[5] for s in statements}
    assert {
        "train_images",
        "raw_train",
        "raw_predict",
        "predictions",
        "model_versions",
        "archive_chunks",
        "checkpoints",
    } <= tables
