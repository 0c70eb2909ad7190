"""The model registry through a real database restart, on a Cassandra node of the test's own (handler/soak.py
ScratchNode: other ports and directories, so the shared node other tests use keeps running): a download with the
node down retries and then fails in one line, a download across the restart succeeds, and a publish the node
stops under leaves no visible version. `make soak` prints the same run's figures; the retry rule is unit-tested."""
from __future__ import annotations

import os

import pytest

from handler.soak import ScratchNode, registry, registry_through_a_restart
from training import db

pytestmark = [pytest.mark.cassandra, pytest.mark.slow]


@pytest.fixture(scope="module")
def scratch_node():
    node = ScratchNode()
    node.up()
    yield node
    node.down()


def test_the_registry_through_a_database_restart(scratch_node, model_archive, metrics_file, tmp_path):
    keyspace = f"restart_{os.getpid()}"
    env = {**scratch_node.env, "CASSANDRA_KEYSPACE": keyspace}
    published = registry(env, "publish", str(model_archive), "--metrics", str(metrics_file), "--version", "1")
    assert published.returncode == 0, published.stderr

    figures = registry_through_a_restart(scratch_node, keyspace, model_archive, metrics_file, tmp_path, retry_s=4)

    # Down: it said it would try again, tried for its budget, and ended with one error line.
    failed = figures.failed_download
    assert failed.returncode == 1
    assert "mnist-registry: attempt 1 failed: cannot connect to Cassandra at 127.0.0.1:9142" in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("error: cannot connect to Cassandra at 127.0.0.1:9142")
    assert "gave up after" in failed.stderr
    assert 4 <= figures.failed_after_s < 4 + 30  # its budget, plus one connect timeout and the start of Python
    assert not (tmp_path / "while-down").exists() or not any((tmp_path / "while-down").iterdir())

    # Across the restart: started while the node was down, it retried and then wrote the archive.
    recovered = figures.recovered_download
    assert recovered.returncode == 0, recovered.stderr
    assert "attempt 1 failed" in recovered.stderr
    assert (tmp_path / "after-restart" / model_archive.name).read_bytes() == model_archive.read_bytes()

    # Cut off: some chunks were written when the node stopped, the publish failed, and no version shows.
    assert figures.interrupted_after_chunks >= 1
    assert "Cassandra at 127.0.0.1:9142" in figures.interrupted_error
    assert not figures.visible_after_interruption
    assert figures.republished.returncode == 0, figures.republished.stderr
    listed = registry(env, "list")
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["1", "big"]
    scratch_node.drop(keyspace)


# --- the retry rule ------------------------------------------------------------------------------

class Flaky:
    """Fails with `error` the first `failures` times."""

    def __init__(self, failures: int, error: Exception):
        self.calls, self.failures, self.error = 0, failures, error

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The waits between attempts, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(db.time, "sleep", slept.append)
    return slept


def test_a_database_error_is_tried_again_with_growing_waits(waits):
    lines: list[str] = []
    attempt = Flaky(4, db.DatabaseError("node down"))
    assert db.retrying(attempt, 60, lines.append) == "done"
    assert attempt.calls == 5 and waits == [1, 2, 4, 8]
    assert lines[0] == "attempt 1 failed: node down; trying again in 1 s"
    assert lines[1] == "attempt 2 failed; trying again in 2 s"


def test_the_last_error_ends_it_once_the_budget_is_spent(monkeypatch, waits):
    clock = iter(range(0, 1000, 3))  # each look at the clock: 3 s later
    monkeypatch.setattr(db.time, "monotonic", lambda: next(clock))
    with pytest.raises(db.DatabaseError, match=r"^node down \(gave up after \d+ attempts in 10 s\)$"):
        db.retrying(Flaky(100, db.DatabaseError("node down")), 10, lambda line: None)


def test_other_errors_and_a_zero_budget_are_not_retried(waits):
    attempt = Flaky(1, ValueError("a bug"))
    with pytest.raises(ValueError):
        db.retrying(attempt, 60, lambda line: None)
    with pytest.raises(db.DatabaseError, match=r"^node down$"):
        db.retrying(Flaky(1, db.DatabaseError("node down")), 0, lambda line: None)
    assert attempt.calls == 1 and waits == []
