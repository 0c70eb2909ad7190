"""The invariants behind `make soak` (bench/soak.py prints the figures): under concurrent mixed traffic
every malformed request gets its 4xx and every digit its 200; the model registry through a real database
restart, on a Cassandra node of the test's own (other ports and directories, so the shared node other tests
use keeps running): a download with the node down retries and then fails in one line, a download across the
restart succeeds, and a publish the node stops under leaves no visible version."""

from __future__ import annotations

import http.client
import itertools
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from bodies import encoded
from conftest import ROOT

from bench.soak import listed_versions, malformed, registry_through_a_restart
from handler.client import parse
from registry import db

sys.path.insert(0, str(ROOT / "scripts"))
from cassandra_node import scratch_node  # noqa: E402 (scripts/cassandra_node.py)

MIXED_LOAD_S = 10.0  # at least; on a busy machine longer, until enough malformed requests were answered
MIXED_LOAD_MAX_S = 120.0
THREADS = 32


# --- concurrent mixed traffic --------------------------------------------------------------------


@pytest.mark.serve
@pytest.mark.slow
def test_under_concurrent_mixed_traffic_each_malformed_request_gets_its_4xx_and_each_digit_its_200(server, known):
    """For 10 s or more, 32 threads send one malformed body in ten (each kind soak.py mixes in, in turn) among digits
    the model reads right; bad and good requests share batches and workers, and each gets its own answer.
    Each thread keeps its connection open, as wrk and browsers do: on a connection the client closes after
    each request, the frontend resets some over-size uploads instead of answering 413 (docs/design-notes.md)."""
    images, labels = known
    url = urlsplit(server.url())
    bad = list(malformed(encoded(images[0])).items())
    numbers = itertools.count()  # next() on it is atomic: each request gets its own number
    started, enough = time.monotonic(), 10 * len(bad)
    wrong, answered, lock = [], {"good": 0, "bad": 0}, threading.Lock()

    def going() -> bool:
        elapsed = time.monotonic() - started
        return elapsed < MIXED_LOAD_S or (answered["bad"] < enough and elapsed < MIXED_LOAD_MAX_S)

    def send_until_the_deadline() -> None:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        while going():
            n = next(numbers)
            if n % 10 == 9:
                kind, (body, content_type, status) = bad[n // 10 % len(bad)]
                expected, digit = status, None
            else:
                kind, body, content_type = "good", encoded(images[n % len(images)]), "image/png"
                expected, digit = 200, int(labels[n % len(labels)])
            try:
                connection.request("POST", url.path, body, {"Content-Type": content_type})
                reply = connection.getresponse()
                status, answer = reply.status, parse(reply.read())
            except (OSError, http.client.HTTPException) as error:  # a dropped connection
                connection.close()  # the next request opens a new one
                status, answer = None, repr(error)
            with lock:
                answered["good" if digit is not None else "bad"] += 1
                if status != expected or (digit is not None and answer.get("digit") != digit):
                    wrong.append((kind, expected, status, str(answer)[:80]))
        connection.close()

    with ThreadPoolExecutor(THREADS) as pool:
        for done in [pool.submit(send_until_the_deadline) for _ in range(THREADS)]:
            done.result()
    assert not wrong, f"{len(wrong)} of {sum(answered.values())} answered wrongly, e.g. {wrong[:5]}"
    assert answered["bad"] >= enough, (
        f"only {answered} requests in {MIXED_LOAD_MAX_S:g} s: too few to hold the invariant"
    )


# --- the registry through a database restart -----------------------------------------------------


@pytest.fixture(scope="module")
def scratch():
    """A Cassandra node of this module's own, on empty data; stopped and its data removed afterwards."""
    with scratch_node() as node:
        yield node


@pytest.mark.cassandra
@pytest.mark.slow
def test_the_registry_through_a_database_restart(scratch, model_archive, metrics_file, tmp_path):
    retry_s = 4
    figures = registry_through_a_restart(
        scratch, f"restart_{os.getpid()}", model_archive, metrics_file, tmp_path, retry_s
    )
    where = f"127.0.0.1:{scratch.port}"

    # Down: it said it would try again, tried for its budget, and ended with one error line.
    failed = figures.failed_download
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1
    assert lines[0].startswith(f"mnist-registry: attempt 1 failed: cannot connect to Cassandra at {where}")
    assert len(lines) >= 3 and all(line.startswith("mnist-registry: attempt ") for line in lines[:-1])
    assert lines[-1].startswith(f"error: cannot connect to Cassandra at {where}") and "gave up after" in lines[-1]
    assert retry_s <= figures.failed_after_s < retry_s + 30  # its budget, plus one connect timeout and Python's start
    assert not (tmp_path / "while-down").exists() or not any((tmp_path / "while-down").iterdir())

    # Across the restart: started while the node was down, it retried, then wrote the archive.
    recovered = figures.recovered_download
    assert recovered.returncode == 0, recovered.stderr
    assert "attempt 1 failed" in recovered.stderr
    assert (tmp_path / "after-restart" / model_archive.name).read_bytes() == model_archive.read_bytes()

    # Cut off: the node stopped with chunks written, the publish failed, and `list` shows no such version.
    assert 1 <= figures.interrupted_after_chunks < figures.interrupted_of_chunks
    assert f"Cassandra at {where}" in figures.interrupted_error
    assert figures.listed_after_interruption.returncode == 0, figures.listed_after_interruption.stderr
    assert listed_versions(figures.listed_after_interruption) == ["1"]
    assert figures.republished.returncode == 0, figures.republished.stderr


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
    attempt = Flaky(5, db.DatabaseError("node down"))
    assert db.retrying(attempt, 60, lines.append) == "done"
    assert attempt.calls == 6 and waits == [1, 2, 4, 8, 8]
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
