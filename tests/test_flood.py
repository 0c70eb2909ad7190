"""Floods against the server `make serve` runs (nginx in front of TorchServe, handler/front.py): 300 and 1,000
concurrent 1 MB uploads and 200 slow uploads, each while real digits are sent at 10 a second beside it. The server
must answer every flood connection (429 with Retry-After, or an answer) or time it out, keep answering the real
digits, stay within the chart's memory limit, and never exit; a body over the limit gets 413, never a reset.
`make bench-flood` prints the same figures beside TorchServe alone's."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from bench.flood import PLAN, PeakMemory, flood, raise_open_files_limit
from handler.front import FrontError, Limits, nginx_binary, nginx_config, write_config
from handler.server import Ports, Server, ready, start_torchserve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from container import quantity_bytes  # noqa: E402

HOLD_S = 30.0  # slow uploads wait this long for the server to drop them (nginx: client_body_timeout, 10 s)


def memory_limit() -> int:
    """The serving container's memory limit in the chart, in bytes."""
    values = yaml.safe_load((ROOT / "charts" / "mnist-serve" / "values.yaml").read_text())
    return quantity_bytes(values["resources"]["limits"]["memory"])


@pytest.fixture(scope="module")
def flooded(archive, tmp_path_factory) -> Server:
    """A server of its own: a flood must not disturb the other tests' server."""
    raise_open_files_limit(max(count for _, count in PLAN) + 256)
    with start_torchserve(archive, tmp_path_factory.mktemp("flood-logs"), Ports.free()) as server:
        yield server


@pytest.mark.serve
@pytest.mark.parametrize(("kind", "count"), PLAN, ids=[f"{kind}-{count}" for kind, count in PLAN])
def test_a_flood_is_turned_away_while_real_digits_are_answered(flooded, kind, count):
    processes = [psutil.Process(flooded.process.pid), psutil.Process(flooded.front.pid)]
    with PeakMemory(processes) as memory:
        report = asyncio.run(flood(flooded.url(), kind, count, HOLD_S))
    peak = memory.peak
    print(f"\n{kind} {count}: {json.dumps(report.__dict__)}; peak {peak / 2**20:.0f} MiB")

    statuses = report.flood_statuses
    if kind == "uploads":  # every upload answered: by the handler (random bytes are no image) or 429 at once
        assert set(statuses) <= {"415", "429"} and statuses.get("429", 0) >= count - Limits().max_large, statuses
        assert sum(statuses.values()) == report.flood_requests >= count
        assert report.retry_after_seen
    else:  # every slow upload turned away at once or dropped by the server, none held past HOLD_S
        assert set(statuses) <= {"429", "408", "closed", "reset"} and statuses.get("429", 0), statuses
    assert report.real_sent and report.real_answered_share >= 0.9, report
    assert report.answer_after_s is not None, report  # a digit answered again once it is over (within 60 s)
    assert ready(flooded), "the server stopped answering"
    assert flooded.process.poll() is None and flooded.front.poll() is None
    assert peak < memory_limit(), f"peak {peak / 2**20:.0f} MiB over the chart's limit"
    assert "OutOfMemoryError" not in (flooded.log_dir / "ts_log.log").read_text(errors="replace")


@pytest.mark.serve
@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_a_body_over_the_limit_gets_413_and_never_a_reset(flooded, tmp_path, connection):
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(2_000_000))
    for _ in range(5):  # a reset, when it happens, happens now and then
        done = subprocess.run(
            [
                shutil.which("curl") or "curl",
                "--silent",
                "--show-error",
                "--write-out",
                "\n%{http_code}",
                "--header",
                "Content-Type: image/png",
                "--header",
                f"Connection: {connection}",
                "--header",
                "Expect:",  # the whole body is sent at once, not after a 100 Continue
                "--data-binary",
                f"@{big}",
                flooded.url(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr  # curl: (56) Recv failure: Connection reset by peer
        body, status = done.stdout.rsplit("\n", 1)
        assert status == "413" and json.loads(body)["code"] == 413, done.stdout


def test_the_nginx_configuration_is_valid_and_names_its_limits(tmp_path):
    config = write_config(tmp_path, "127.0.0.1:18080", tmp_path / "inference.sock", "http://127.0.0.1:8088")
    done = subprocess.run(
        [nginx_binary(), "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    text = config.read_text()
    limits = Limits()
    assert f"client_max_body_size {limits.max_body_bytes};" in text
    assert f"limit_conn all {limits.max_requests};" in text and f"limit_conn large {limits.max_large};" in text
    assert "add_header Access-Control-Allow-Origin http://127.0.0.1:8088 always;" in text
    assert f"server unix:{tmp_path / 'inference.sock'};" in text  # TorchServe, over a Unix socket
    # TorchServe's max_request_size is the body limit nginx enforces.
    assert f"max_request_size={limits.max_body_bytes}" in (ROOT / "handler" / "config.properties").read_text()
    with pytest.raises(FrontError, match="HOST:PORT"):
        nginx_config("8080", tmp_path / "inference.sock", tmp_path)
