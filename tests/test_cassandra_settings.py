"""Connection settings, the Cluster arguments for a local node and for Astra, token ranges: no database needed."""
from __future__ import annotations

import pytest
from cassandra.auth import PlainTextAuthProvider

from training import db
from training.config import CassandraSettings, SettingsError, cassandra_settings

TOKEN = "AstraCS:secret-token-value"


def test_defaults_are_the_local_node():
    settings = cassandra_settings({})
    assert settings == CassandraSettings(hosts=("127.0.0.1",), port=9042, keyspace="mnist")
    assert not settings.astra


def test_local_settings_from_the_environment():
    settings = cassandra_settings({"CASSANDRA_HOSTS": "10.0.0.1, 10.0.0.2", "CASSANDRA_PORT": "19042", "CASSANDRA_KEYSPACE": "digits"})
    assert settings.hosts == ("10.0.0.1", "10.0.0.2")
    kwargs = db.cluster_kwargs(settings)
    assert kwargs["contact_points"] == ["10.0.0.1", "10.0.0.2"]
    assert kwargs["port"] == 19042
    assert "cloud" not in kwargs and "auth_provider" not in kwargs
    assert kwargs["connect_timeout"] == kwargs["control_connection_timeout"] == 5.0


def test_astra_settings_build_a_cloud_cluster_with_the_token(tmp_path):
    bundle = tmp_path / "secure-connect-mnist.zip"
    bundle.write_bytes(b"PK")
    settings = cassandra_settings({"ASTRA_DB_SECURE_BUNDLE": str(bundle), "ASTRA_DB_TOKEN": TOKEN, "CASSANDRA_HOSTS": "ignored"})
    assert settings.astra
    kwargs = db.cluster_kwargs(settings)
    assert kwargs["cloud"] == {"secure_connect_bundle": str(bundle)}
    auth = kwargs["auth_provider"]
    assert isinstance(auth, PlainTextAuthProvider)
    assert (auth.username, auth.password) == ("token", TOKEN)
    # The driver refuses contact points together with a cloud config.
    assert "contact_points" not in kwargs and "port" not in kwargs


def test_astra_token_is_read_from_a_mounted_secret_file(tmp_path):
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(b"PK")
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")  # Secrets created from files often end in a newline
    settings = cassandra_settings({"ASTRA_DB_SECURE_BUNDLE": str(bundle), "ASTRA_DB_TOKEN_FILE": str(secret)})
    assert settings.token == TOKEN


def test_the_token_never_appears_in_messages(tmp_path):
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(b"PK")
    settings = cassandra_settings({"ASTRA_DB_SECURE_BUNDLE": str(bundle), "ASTRA_DB_TOKEN": TOKEN})
    assert TOKEN not in repr(settings)
    assert TOKEN not in settings.where()


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
    ],
)
def test_unusable_settings_are_named(environ, message):
    with pytest.raises(SettingsError, match=message):
        cassandra_settings(environ)


@pytest.mark.parametrize("count", [1, 2, 3, 8, 32, 1000])
def test_token_ranges_cover_the_ring_once(count):
    ranges = db.token_ranges(count)
    assert len(ranges) == count
    assert ranges[0][0] == db.MIN_TOKEN and ranges[-1][1] == db.MAX_TOKEN
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
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
    assert {"train_images", "raw_train", "raw_predict", "predictions", "model_versions", "archive_chunks", "checkpoints"} <= tables
