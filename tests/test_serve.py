"""The archive served by a real TorchServe: every input form, bad input, a killed worker, health, metrics and the
locked management API."""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from bodies import encoded, png_claiming, zip_archive
from served import send_all

from handler.client import post
from handler.front import Limits
from handler.server import Ports, Server

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MIN_ACCURACY = 0.99
BAD_INPUT_BOUND_S = 10.0  # a hostile body must be refused quickly; a safety bound, not a benchmark
RECOVERY_BOUND_S = 120.0  # a killed worker is replaced (retry after 1 s, then torch import and warm-up)


# --- helpers -----------------------------------------------------------------------------------


def as_json(document) -> tuple[bytes, str]:
    return json.dumps(document).encode(), "application/json"


def assert_still_serving(server: Server, known) -> None:
    images, labels = known
    status, answer, _ = post(server.url(), encoded(images[0]))
    assert (status, answer["digit"]) == (200, labels[0])


# --- every input form ---------------------------------------------------------------------------

FORMS = {
    "PNG body": lambda image: (encoded(image), "application/octet-stream"),
    "JPEG body": lambda image: (encoded(image, "JPEG", quality=90), "image/jpeg"),
    "base64 JSON": lambda image: as_json({"data": base64.b64encode(encoded(image)).decode()}),
    "28x28 nested array": lambda image: as_json(image.tolist()),
    "784 flat array": lambda image: as_json(image.ravel().tolist()),
}


@pytest.mark.parametrize("form", FORMS)
def test_each_input_form_reads_real_test_digits(server, digits, form):
    images, labels = digits
    replies = send_all(server, [FORMS[form](image) for image in images])
    assert [status for status, _, _ in replies] == [200] * len(images)
    answered = np.array([answer["digit"] for _, answer, _ in replies])
    assert (answered == labels).mean() >= MIN_ACCURACY


def test_instances_are_answered_in_order(server, digits):
    images, labels = digits
    # Alternate base64 PNGs and pixel arrays inside each request, 50 images a request.
    instances = [
        base64.b64encode(encoded(image)).decode() if n % 2 else image.tolist() for n, image in enumerate(images)
    ]
    requests = [as_json({"instances": instances[start : start + 50]}) for start in range(0, len(images), 50)]
    replies = send_all(server, requests)
    assert [status for status, _, _ in replies] == [200] * len(requests)
    answered = np.array([item["digit"] for _, answer, _ in replies for item in answer["predictions"]])
    assert len(answered) == len(images)
    assert (answered == labels).mean() >= MIN_ACCURACY


def test_an_answer_has_the_digit_its_confidence_and_ten_probabilities(server, known):
    images, labels = known
    status, answer, headers = post(server.url(), encoded(images[1]))
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert answer["digit"] == labels[1]
    assert list(answer["probabilities"]) == [str(digit) for digit in range(10)]
    assert answer["confidence"] == max(answer["probabilities"].values())
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


# --- bad input ----------------------------------------------------------------------------------


def truncated_png(digits) -> bytes:
    whole = encoded(digits[0][0])
    return whole[: len(whole) // 2]


BAD_INPUTS = {
    # name: (body, content type, status, words in the error)
    "empty body": (lambda d: b"", "application/octet-stream", 400, "the request body is empty"),
    "plain text": (lambda d: b"what digit is this?", "text/plain", 415, "plain text"),
    "truncated PNG": (truncated_png, "image/png", 400, "truncated or corrupt"),
    "10,000 x 10,000 image": (lambda d: png_claiming(10_000, 10_000), "image/png", 413, "10,000 x 10,000"),
    "wrong JSON shape": (lambda d: json.dumps([[0] * 28] * 27).encode(), "application/json", 400, "got 27 x 28"),
    "NaN pixels": (lambda d: b"[" + b"0, " * 783 + b"NaN]", "application/json", 400, "NaN or Infinity"),
    "out-of-range pixels": (lambda d: json.dumps([0] * 783 + [256]).encode(), "application/json", 400, "0..255"),
    "too many instances": (
        lambda d: json.dumps({"instances": [[0] * 784] * 65}).encode(),
        "application/json",
        413,
        "65 instances",
    ),
    "invalid JSON": (lambda d: b'{"data": ', "application/json", 400, "not valid JSON"),
    "JSON content type, text body": (lambda d: b"seven", "application/json", 415, "plain text"),
    "a ZIP archive": (lambda d: zip_archive(), "application/zip", 415, "a ZIP archive"),
    # curl --data-binary @digit.png without -H: TorchServe parses the PNG as form fields.
    "PNG sent as a form": (lambda d: encoded(d[0][0]), "application/x-www-form-urlencoded", 415, "Content-Type"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(server, known, name):
    make_body, content_type, status, words = BAD_INPUTS[name]
    started = time.monotonic()
    reply = post(server.url(), make_body(known), content_type)
    assert time.monotonic() - started < BAD_INPUT_BOUND_S
    assert reply.status == status and reply.headers["Content-Type"] == "application/json"
    assert reply.answer["code"] == status and words in reply.answer["error"]
    assert_still_serving(server, known)


def test_a_zip_bomb_png_is_refused_before_it_inflates(server, known, zip_bomb_png):
    started = time.monotonic()
    status, answer, _ = post(server.url(), zip_bomb_png, "image/png")
    assert time.monotonic() - started < BAD_INPUT_BOUND_S
    assert status == 413 and "10,000 x 10,000" in answer["error"]
    assert_still_serving(server, known)


def test_a_body_over_the_size_limit_is_refused_by_the_frontend(server, known):
    """On a kept-alive connection (what browsers, wrk and the Service's clients use) the frontend answers 413
    and reads the rest of the body away. With `Connection: close` (urllib's) it may close the socket while
    the upload still arrives, and the client sees a reset instead (seen in about 1 of 70 uploads)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.ports.inference, timeout=30)
    try:
        connection.request(
            "POST", "/predictions/mnist", body=b"\x89PNG" + bytes(2 << 20), headers={"Content-Type": "image/png"}
        )
        status = connection.getresponse().status
    finally:
        connection.close()
    assert status == 413  # TorchServe's HTTP layer, with an empty body
    assert_still_serving(server, known)


def test_many_concurrent_maximum_size_bodies_are_answered_or_turned_away_at_once(server, known):
    # 128 uploads of 1 MiB, 64 at a time. nginx lets Limits.max_large of them through at once (a PNG signature and
    # no image: refused by the handler) and answers the rest 429 with Retry-After, without reading them.
    body = b"\x89PNG\r\n\x1a\n" + bytes((1 << 20) - 100)
    with ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(lambda _: post(server.url(), body), range(128)))
    statuses = Counter(reply.status for reply in replies)
    assert set(statuses) <= {400, 429} and statuses[400] >= Limits().max_large, statuses
    assert all(reply.headers["Retry-After"] == "1" for reply in replies if reply.status == 429)
    assert all(reply.answer["code"] == reply.status for reply in replies), replies[:3]
    assert_still_serving(server, known)


# --- one batch, several answers -----------------------------------------------------------------


def batches(log_dir: Path) -> list[set[str]]:
    """The request ids of each batch a worker ran, from the HandlerTime metric lines it logs."""
    lines = (log_dir / "ts_log.log").read_text(errors="replace")
    return [
        set(ids.split(","))
        for ids in re.findall(
            r"\[METRICS\]HandlerTime\.Milliseconds:[^|]*\|[^|]*\|[^|]*\|#hostname:[^,]*,\d+,([^,\s]+(?:,[^,\s]+)*)",
            lines,
        )
    ]


def test_good_and_bad_requests_in_one_batch_each_get_their_own_answer(server, known):
    images, labels = known
    good = [(encoded(image), "image/png") for image in images[:24]]
    bad = [
        (b"", "application/octet-stream"),
        (b"seven", "text/plain"),
        (json.dumps([0] * 783).encode(), "application/json"),
    ] * 3
    requests = good + bad

    def send(gate, request):
        gate.wait()  # all at once, so they reach the frontend within one batch delay
        return post(server.url(), *request)

    for _ in range(5):  # concurrency gives no guarantee of a shared batch; try a few times
        gate = threading.Barrier(len(requests))
        with ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(functools.partial(send, gate), requests))
        good_replies, bad_replies = replies[: len(good)], replies[len(good) :]
        assert [(reply.status, reply.answer["digit"]) for reply in good_replies] == [
            (200, label) for label in labels[:24]
        ]
        assert [reply.status for reply in bad_replies] == [400, 415, 400] * 3
        assert all(reply.answer["code"] == reply.status and reply.answer["error"] for reply in bad_replies)
        good_ids = {reply.headers["x-request-id"] for reply in good_replies}
        bad_ids = {reply.headers["x-request-id"] for reply in bad_replies}
        if any(batch & good_ids and batch & bad_ids for batch in batches(server.log_dir)):
            return
    pytest.fail("in 5 attempts no batch held both good and bad requests")


# --- health, metrics, management ----------------------------------------------------------------


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def test_ping_says_healthy(server):
    status, _, text = get(server.url("/ping"))
    assert status == 200 and json.loads(text) == {"status": "Healthy"}


def test_metrics_port_serves_prometheus_text(server, known):
    assert_still_serving(server, known)  # at least one request counted
    status, content_type, text = get(server.url("/metrics", server.ports.metrics))
    assert status == 200 and content_type.startswith("text/plain")
    counted = re.search(r'^ts_inference_requests_total\{model_name="mnist",[^}]*\} (\d+)', text, re.MULTILINE)
    assert counted and float(counted.group(1)) >= 1


def test_every_answer_names_the_model_version_and_archive_checksum(server, known, archive):
    """In the body, in the X-Model-Version and X-Model-Sha256 headers, and as labels of the ModelServed metric;
    here the archive's own version (docker/entrypoint.py passes the registry's)."""
    import hashlib
    import zipfile

    with zipfile.ZipFile(archive) as mar:
        version = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]
    served = {"version": version, "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()[:12]}
    images, labels = known
    single = post(server.url(), encoded(images[0]))
    several = post(server.url(), *as_json({"instances": [image.tolist() for image in images[:3]]}))
    refused = post(server.url(), b"seven", "text/plain")
    assert (single.answer["digit"], single.answer["model"]) == (labels[0], served)
    assert [p["digit"] for p in several.answer["predictions"]] == labels[:3].tolist() and several.answer[
        "model"
    ] == served
    for reply in (single, several, refused):
        assert (reply.headers["X-Model-Version"], reply.headers["X-Model-Sha256"]) == (version, served["sha256"])
    assert refused.status == 415 and "model" not in refused.answer  # an error names no prediction's model
    _, _, text = get(server.url("/metrics", server.ports.metrics))
    (labels_text,) = re.findall(r"^ModelServed\{(.*)\} 1\.0$", text, re.MULTILINE)
    assert f'ModelVersion="{version}"' in labels_text and f'ModelSha256="{served["sha256"]}"' in labels_text


def listening_addresses(server: Server, port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    addresses = set()
    for connection in server.frontend().net_connections("inet"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            address = ipaddress.ip_address(connection.laddr.ip)
            addresses.add(getattr(address, "ipv4_mapped", None) or address)  # "::ffff:127.0.0.1" is 127.0.0.1
    return addresses


def test_management_and_inference_apis_listen_on_loopback_only(server):
    # Management can load code: loopback only.
    addresses = listening_addresses(server, server.ports.management)
    assert addresses and all(address.is_loopback for address in addresses)
    # Inference is reached only through nginx, which bounds what clients can hold: TorchServe's own inference API
    # is a Unix socket in a directory only the server's user can enter, and no TCP port.
    assert not listening_addresses(server, server.ports.inference)
    sockets = {c.laddr for c in server.frontend().net_connections("unix")}
    assert str(server.backend) in sockets and server.backend.is_socket()
    assert stat.S_IMODE(server.backend.parent.stat().st_mode) == 0o700
    assert server.backend.parent.stat().st_uid == os.geteuid()
    # What a public listener looks like (Prometheus' metrics port), so the check above can tell the two apart.
    metrics = listening_addresses(server, server.ports.metrics)
    assert any(address.is_unspecified for address in metrics)


def test_management_api_cannot_be_reached_through_a_network_address(server):
    outward = [
        a.address
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
    ]
    if not outward:
        pytest.skip("this machine has no network address besides loopback")
    with socket.create_connection((outward[0], server.ports.inference), timeout=5):
        pass  # the public API is reachable that way...
    with pytest.raises(ConnectionRefusedError):  # ...the management API is not
        socket.create_connection((outward[0], server.ports.management), timeout=5).close()


def test_model_management_calls_are_refused(server, known):
    management = server.url("/models?url=mnist.mar&model_name=other", server.ports.management)
    status, answer, _ = post(management, b"")
    assert status == 405 and "not allowed" in answer["message"]
    status, _, text = get(server.url("/models", server.ports.management))
    assert status == 200 and [model["modelName"] for model in json.loads(text)["models"]] == ["mnist"]
    assert_still_serving(server, known)


# --- the command-line client --------------------------------------------------------------------


def mnist_predict(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("mnist-predict")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60)


def test_mnist_predict_prints_the_digit_for_each_file(server, known, tmp_path):
    images, labels = known
    files = []
    for number in range(3):
        files.append(tmp_path / f"digit-{number}.png")
        files[-1].write_bytes(encoded(images[number]))
    done = mnist_predict("--url", server.url(), *map(str, files))
    assert done.returncode == 0, done.stderr
    assert [line.split(": ")[1].split(" ")[0] for line in done.stdout.splitlines()] == [
        str(label) for label in labels[:3]
    ]
    raw = mnist_predict("--url", server.url(), "--json", str(files[0]))
    assert json.loads(raw.stdout)["digit"] == labels[0]


def test_mnist_predict_reports_a_refused_file_and_a_missing_server(server, tmp_path):
    text = tmp_path / "note.txt"
    text.write_text("seven")
    refused = mnist_predict("--url", server.url(), str(text))
    assert refused.returncode == 1 and "answered 415" in refused.stderr and "plain text" in refused.stderr
    nowhere = f"http://127.0.0.1:{Ports.free().inference}/predictions/mnist"
    down = mnist_predict("--url", nowhere, str(text))
    assert down.returncode == 1 and "is the server running?" in down.stderr


# --- a worker dies ------------------------------------------------------------------------------


def worker_pids(server: Server) -> list[int]:
    status, _, text = get(server.url("/models/mnist", server.ports.management))
    workers = json.loads(text)[0]["workers"]
    return [worker["pid"] for worker in workers if worker["status"] == "READY"]


def test_a_killed_worker_is_replaced_and_predictions_go_on(server, known, record_property):
    images, labels = known
    victim = server.workers()[0]
    assert victim.pid in worker_pids(server)
    killed = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    failures = 0
    while True:  # predictions throughout: the other worker answers while this one comes back
        elapsed = time.monotonic() - killed
        assert elapsed < RECOVERY_BOUND_S, f"no replacement worker after {elapsed:.0f} s"
        status, answer, _ = post(server.url(), encoded(images[2]))
        failures += status != 200
        pids = worker_pids(server)
        if len(pids) == 2 and victim.pid not in pids:
            break
        time.sleep(0.2)
    recovery = time.monotonic() - killed
    record_property("worker_recovery_seconds", round(recovery, 1))
    print(
        f"\nworker {victim.pid} killed: replaced and READY after {recovery:.1f} s, {failures} failed predictions "
        f"meanwhile"
    )
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
    replies = send_all(server, [(encoded(image), "image/png") for image in images[:64]])
    assert [(reply.status, reply.answer["digit"]) for reply in replies] == [(200, label) for label in labels[:64]]
