"""make bench-serve's peer and report: KServe's model server does exactly our work, and the report
sets both side by side beside the targets (a short run: the figures themselves are not checked)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
from reference_model import reference_model_dir

from bench.serve import BEFORE_NGINX, archive_at, kserve_peer
from handler.client import encoded, post
from handler.server import Ports, start_torchserve

pytestmark = [pytest.mark.serve, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def peer_answer(url: str, png: bytes) -> dict:
    request = urllib.request.Request(url, data=png, headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def test_the_peer_answers_every_digit_exactly_as_we_do(archive, mnist, tmp_path):
    pngs = [encoded(image) for image in mnist.test_images[:40]]
    with start_torchserve(archive, tmp_path / "logs", Ports.free()) as server:
        ours = [post(server.url(), png, "image/png") for png in pngs]
    assert all(reply.status == 200 for reply in ours)
    model = tmp_path / "model.pt"
    model.write_bytes((reference_model_dir() / "model.pt").read_bytes())
    with kserve_peer(model, 1, tmp_path / "kserve.log") as peer:
        theirs = [peer_answer(peer.url, png) for png in pngs]
    # Same decoding, same model, same JSON: the same digits and probabilities to 6 decimals (ours also names its model).
    assert [{key: value for key, value in reply.answer.items() if key != "model"} for reply in ours] == theirs
    assert sum(answer["digit"] == label for answer, label in zip(theirs, mnist.test_labels[:40], strict=True)) >= 39


def test_the_baseline_is_the_model_packed_with_that_commits_handler(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes((reference_model_dir() / "model.pt").read_bytes())
    archive = archive_at(BEFORE_NGINX, model, tmp_path)
    then = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BEFORE_NGINX}:handler/mnist_handler.py"], capture_output=True, check=True
    ).stdout
    with zipfile.ZipFile(archive) as mar:
        assert mar.read("mnist_handler.py") == then
        assert mar.read("model.pt") == model.read_bytes()
    assert then != (ROOT / "handler" / "mnist_handler.py").read_bytes()  # a different server from today's
    with pytest.raises(RuntimeError, match="not in this checkout's history"):
        archive_at("0" * 40, model, tmp_path)


def test_the_report_sets_ours_and_the_peer_side_by_side_beside_the_targets(archive, tmp_path):
    done = subprocess.run(
        [
            str(ROOT / "scripts" / "with-wrk.sh"),
            sys.executable,
            "-m",
            "bench.serve",
            "--archive",
            str(archive),
            "--seconds",
            "1",
            "--connections",
            "1,4",
            "--peer-workers",
            "1",
            "--logs",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    servers = [
        "ours (nginx + TorchServe 0.12)",
        "before nginx (f4260e4)",
        "TorchServe alone, no nginx",
        "KServe 0.21.0, 1 worker",
    ]
    for connections in (1, 4):
        rows = [line for line in lines if line.strip().startswith(f"{connections}  ")]
        named = [next((server for server in servers if server in row), row) for row in rows]
        assert named == servers, lines  # all four, in that order
        kept = next(line for line in lines if line.startswith(f"{connections} connections: "))
        assert "of the req/s before nginx (f4260e4) (target >= 95%: " in kept, kept
        assert re.search(r": (met|MISSED); rounds \d+% to \d+%\); ", kept), kept
    assert sum("ours / peer" in line for line in lines) == 2
    assert any(line.startswith("TorchServe alone (a no-op handler") for line in lines)
    [batches] = [line for line in lines if line.startswith("in-process, 1 thread, img/s at batch 1 / 8 / 32: ")]
    assert "the model as saved " in batches and "; the worker's copy for batches " in batches
    for target in ("p50 <= 1.5 ms", ">= 600 req/s", "CPU <= 1.5 ms/request", ">= 2 x the peer's req/s", "p99 <= 50 ms"):
        line = next(line for line in lines if target in line)
        assert line.rstrip().endswith(("met", "MISSED")), line
