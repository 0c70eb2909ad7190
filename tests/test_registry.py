"""The model registry against the local node: round trips, damaged archives, a killed publish, aliases."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
from conftest import ROOT, run_cli

from bench.big_archive import big_archive
from registry.store import (
    AliasInUse,
    CorruptArchive,
    DuplicateVersion,
    MissingChunk,
    Registry,
    VersionNotFound,
    read_metrics,
)

pytestmark = pytest.mark.cassandra

SMALL_CHUNKS = 4096  # a real .mar of ~36 kB then spans several chunks
BIG_MIB = 128  # publishing this takes seconds on the local node: time to kill it midway


@pytest.fixture(scope="module")
def registry(cassandra) -> Registry:
    return Registry(cassandra)


@pytest.fixture(scope="module")
def small_chunks(cassandra) -> Registry:
    return Registry(cassandra, chunk_size=SMALL_CHUNKS)


@pytest.fixture(scope="module")
def metrics(metrics_file) -> dict:
    return read_metrics(metrics_file)


def registry_cli(env, *args, timeout=120):
    return run_cli(env, "registry.cli", *args, timeout=timeout)


def chunks_of(session, version: str) -> list[tuple]:
    return list(session.execute("SELECT upload, chunk FROM archive_chunks WHERE version = %s", (version,)))


def test_publish_list_show_download_round_trip_with_the_cli(cassandra_env, model_archive, metrics_file, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "mnist-registry")  # the [project.scripts] entry point
    published = subprocess.run(
        [script, "publish", str(model_archive), "--metrics", str(metrics_file), "--version", "cli-1"],
        env=cassandra_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert published.returncode == 0, published.stderr
    sha = hashlib.sha256(model_archive.read_bytes()).hexdigest()
    assert "published version cli-1: mnist.mar" in published.stdout and sha in published.stdout

    listed = registry_cli(cassandra_env, "list")
    assert listed.returncode == 0, listed.stderr
    [line] = [line for line in listed.stdout.splitlines() if line.startswith("cli-1 ")]
    assert "99.31%" in line and sha[:12] in line

    shown = registry_cli(cassandra_env, "show", "cli-1")
    assert f"sha256:           {sha}" in shown.stdout
    assert "data fingerprint: " + "06b0d1f1" * 8 in shown.stdout
    assert "git commit:       0123abc" in shown.stdout

    downloaded = registry_cli(cassandra_env, "download", "cli-1", "--out", str(tmp_path / "store"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert (tmp_path / "store" / "mnist.mar").read_bytes() == model_archive.read_bytes()
    assert os.listdir(tmp_path / "store") == ["mnist.mar"]  # no temporary file left behind


def test_list_and_show_in_json_carry_the_run_that_trained_the_version(
    cassandra_env, model_archive, metrics_file, tmp_path
):
    """A script reads the registry as JSON; a version from the training chart says which run made it."""
    from_chart = tmp_path / "metrics.json"
    lineage = {"world_size": 2, "job": "mnist-train", "image": "mnist-serve:0.1.0-cpu-train"}
    from_chart.write_text(json.dumps({**json.loads(metrics_file.read_text()), **lineage}))
    published = registry_cli(
        cassandra_env, "publish", str(model_archive), "--metrics", str(from_chart), "--version", "run-2"
    )
    assert published.returncode == 0, published.stderr

    listed = registry_cli(cassandra_env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = [v for v in json.loads(listed.stdout) if v["version"] == "run-2"]
    assert entry["run"] == lineage and entry["sha256"] == hashlib.sha256(model_archive.read_bytes()).hexdigest()
    assert entry["test_accuracy"] == 0.9931 and entry["size"] == model_archive.stat().st_size

    shown = registry_cli(cassandra_env, "show", "run-2", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == entry
    text = registry_cli(cassandra_env, "show", "run-2").stdout
    assert "run:              2 ranks, Job mnist-train, image mnist-serve:0.1.0-cpu-train" in text


def test_an_archive_of_many_chunks_comes_back_byte_for_byte(small_chunks, model_archive, metrics, tmp_path):
    version = small_chunks.publish(model_archive, metrics, "chunks-1")
    assert version.chunk_count == -(-model_archive.stat().st_size // SMALL_CHUNKS) > 1
    found, path = small_chunks.download("chunks-1", tmp_path)
    assert path.read_bytes() == model_archive.read_bytes()
    assert found.metrics == metrics and found.parameters == {"epochs": 8, "lr": 0.01}


def test_versions_are_numbered_when_none_is_given(registry, model_archive, metrics):
    first = registry.publish(model_archive, metrics)
    second = registry.publish(model_archive, metrics)
    assert first.version.isdigit() and int(second.version) == int(first.version) + 1


def test_a_duplicate_version_is_refused_and_the_original_kept(registry, cassandra, model_archive, metrics, tmp_path):
    original = registry.publish(model_archive, metrics, "dup-1")
    other = tmp_path / "other.mar"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", "{}")
    with pytest.raises(DuplicateVersion, match="version dup-1 is already published"):
        registry.publish(other, metrics, "dup-1")
    assert [upload for upload, _ in chunks_of(cassandra, "dup-1")] == [original.upload]
    assert registry.archive("dup-1")[1] == model_archive.read_bytes()


@pytest.mark.parametrize("column", ["data", "data and its sha256"])
def test_an_altered_chunk_is_refused_on_download(
    small_chunks, cassandra, cassandra_env, model_archive, metrics, tmp_path, column
):
    name = f"altered-{len(column)}"
    version = small_chunks.publish(model_archive, metrics, name)
    altered = bytes(SMALL_CHUNKS)
    if column == "data":
        cassandra.execute(
            "UPDATE archive_chunks SET data = %s WHERE version = %s AND upload = %s AND chunk = 3",
            (altered, name, version.upload),
        )
        message = f"chunk 3 of {version.chunk_count} does not match its sha256"
    else:  # rewritten consistently: only the whole archive's sha256 can tell
        digest = hashlib.sha256(altered).hexdigest()
        cassandra.execute(
            "UPDATE archive_chunks SET data = %s, sha256 = %s WHERE version = %s AND upload = %s AND chunk = 3",
            (altered, digest, name, version.upload),
        )
        message = f"the version records {version.size:,} bytes with {version.sha256[:12]}"
    with pytest.raises(CorruptArchive, match=message):
        small_chunks.download(name, tmp_path)
    assert os.listdir(tmp_path) == []  # neither the archive nor a temporary file

    result = registry_cli(cassandra_env, "download", name, "--out", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: version {name}: ") and len(result.stderr.splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_a_missing_chunk_is_refused_on_download(small_chunks, cassandra, model_archive, metrics, tmp_path):
    version = small_chunks.publish(model_archive, metrics, "missing-1")
    cassandra.execute(
        "DELETE FROM archive_chunks WHERE version = %s AND upload = %s AND chunk = 2", ("missing-1", version.upload)
    )
    with pytest.raises(MissingChunk, match=f"version missing-1: chunk 2 of {version.chunk_count} is missing"):
        small_chunks.download("missing-1", tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_killed_publish_leaves_no_version(
    registry, cassandra, cassandra_env, model_archive, metrics, metrics_file, tmp_path
):
    big = big_archive(tmp_path / "big.mar", BIG_MIB)
    total_chunks = -(-big.stat().st_size // (1 << 20))
    publish = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "registry.cli",
            "publish",
            str(big),
            "--metrics",
            str(metrics_file),
            "--version",
            "killed-1",
        ],
        cwd=ROOT,
        env=cassandra_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first_chunk = cassandra.prepare("SELECT chunk FROM archive_chunks WHERE version = ? LIMIT 1")
    deadline = time.monotonic() + 60
    try:
        while cassandra.execute(first_chunk, ("killed-1",)).one() is None:
            assert publish.poll() is None, f"publish ended before a chunk was seen: {publish.communicate()}"
            assert time.monotonic() < deadline, "no chunk written within 60 s"
            time.sleep(0.01)
        publish.send_signal(signal.SIGKILL)
    finally:
        publish.kill()
        publish.communicate()
    assert publish.returncode == -signal.SIGKILL  # killed, not finished

    orphans = chunks_of(cassandra, "killed-1")
    assert 0 < len(orphans) < total_chunks, "the kill should land midway"
    assert "killed-1" not in [v.version for v in registry.versions()]
    with pytest.raises(VersionNotFound):
        registry.get("killed-1")

    # Publishing that version again works, and the orphan chunks go.
    published = registry.publish(model_archive, metrics, "killed-1")
    assert {upload for upload, _ in chunks_of(cassandra, "killed-1")} == {published.upload}
    assert registry.archive("killed-1")[1] == model_archive.read_bytes()


def test_promote_moves_an_alias_and_download_follows_it(registry, cassandra_env, model_archive, metrics, tmp_path):
    registry.publish(model_archive, metrics, "alias-1")
    registry.publish(model_archive, metrics, "alias-2")
    first = registry_cli(cassandra_env, "promote", "alias-1", "--alias", "canary")
    assert first.returncode == 0 and first.stdout == "canary -> version alias-1\n"
    second = registry_cli(cassandra_env, "promote", "alias-2", "--alias", "canary")
    assert second.stdout == "canary -> version alias-2 (was alias-1)\n"
    assert registry.get("canary").version == "alias-2"
    assert registry.aliases()["canary"] == "alias-2"
    version, path = registry.download("canary", tmp_path)
    assert version.version == "alias-2" and path.read_bytes() == model_archive.read_bytes()
    assert [v.aliases for v in registry.versions() if v.version in ("alias-1", "alias-2")] == [[], ["canary"]]


def test_delete_refuses_a_version_an_alias_points_at_unless_forced(
    registry, cassandra, cassandra_env, model_archive, metrics
):
    registry.publish(model_archive, metrics, "delete-1")
    registry.promote("delete-1", "doomed")
    refused = registry_cli(cassandra_env, "delete", "delete-1")
    assert refused.returncode == 1
    assert (
        refused.stderr
        == "error: version delete-1 is what doomed points at; promote another version first, or pass --force to "
        "delete the alias too\n"
    )
    with pytest.raises(AliasInUse):
        registry.delete("delete-1")
    assert registry.get("doomed").version == "delete-1"

    assert registry.delete("delete-1", force=True) == ["doomed"]
    with pytest.raises(VersionNotFound):
        registry.get("delete-1")
    with pytest.raises(VersionNotFound):
        registry.get("doomed")
    assert chunks_of(cassandra, "delete-1") == []


def test_unknown_names_get_a_specific_error(registry, cassandra_env):
    with pytest.raises(VersionNotFound, match="no version or alias 'no-such-version'"):
        registry.get("no-such-version")
    result = registry_cli(cassandra_env, "download", "no-such-version")
    assert result.returncode == 1
    assert (
        result.stderr
        == "error: no version or alias 'no-such-version' in the registry; `mnist-registry list` shows what there is\n"
    )
    with pytest.raises(VersionNotFound):
        registry.delete("no-such-version")


def test_every_subcommand_explains_itself():
    for command in ("publish", "list", "show", "download", "promote", "delete"):
        result = subprocess.run(
            [sys.executable, "-m", "registry.cli", command, "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0 and f"usage: mnist-registry {command}" in result.stdout
        assert "CASSANDRA_KEYSPACE" in result.stdout
