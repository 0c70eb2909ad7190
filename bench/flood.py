"""Floods a prediction endpoint as an attacker would, while a real client sends real digits beside it, and prints
a JSON line per flood: what the flood got, what the real digits got (share answered right, p99), how long after
the flood a real digit is answered again, and whether the server is still there.

Floods (bounded in count and time, for loopback or the project's own test network only):
  uploads N   N connections at once, each sending 1,000,000-byte bodies of random bytes, one after the other, for 5 s
  slow N      N connections that send their headers and the first bytes of a 1,000,000-byte body, then stall
Without --flood, the issue's three: uploads 300, uploads 1000, slow 200.

  python -m bench.flood --url http://127.0.0.1:8080/predictions/mnist --flood uploads --count 300
  python -m bench.flood --archive artifacts/model-store/mnist.mar --baseline     (make bench-flood)

--archive starts the server of `make serve` (nginx in front of TorchServe) on free loopback ports and also
prints the peak memory of its processes; --baseline first floods TorchServe alone, as it ran before nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import random
import resource
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
DIGIT = ROOT / "samples" / "digit-7.png"
DIGIT_LABEL = 7
BODY_BYTES = 1_000_000
REAL_RATE = 10.0  # real digits per second, during the flood
UPLOADS_S = 5.0  # an upload flood keeps its N connections uploading this long
TARGETS = {
    "real_answered_share": "at least 0.90 of real digits answered with 200 during the flood",
    "answer_after_s": "a real digit answered within 2 s after the flood",
}


@dataclass
class Report:
    flood: str
    count: int
    flood_statuses: dict = field(default_factory=dict)  # HTTP status (or "reset", "timeout", ...) -> count
    flood_requests: int = 0
    flood_seconds: float = 0.0
    real_sent: int = 0
    real_right: int = 0
    real_statuses: dict = field(default_factory=dict)
    real_p99_s: float | None = None
    real_answered_share: float = 0.0
    answer_after_s: float | None = None
    retry_after_seen: bool = False


async def exchange(host: str, port: int, data: bytes, timeout: float, silent: str) -> tuple:
    """DATA sent on a fresh connection and the response read within TIMEOUT: (status, or what went wrong, response
    headers, response body). SILENT names a server that said nothing in time."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (TimeoutError, OSError):
        return "refused", {}, b""
    try:
        writer.write(data)  # no drain: a server may answer before it has read a large body (a 413, a 429)
        return await asyncio.wait_for(read_response(reader), timeout)
    except TimeoutError:
        return silent, {}, b""
    except (ConnectionResetError, BrokenPipeError):
        return "reset", {}, b""
    except (OSError, asyncio.IncompleteReadError, ValueError):
        return "broken", {}, b""
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1)


async def request(host: str, port: int, path: str, body: bytes, content_type: str, timeout: float) -> tuple:
    """One POST on a fresh connection."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return await exchange(host, port, head.encode() + body, timeout, "timeout")


async def read_response(reader: asyncio.StreamReader) -> tuple:
    """Status, headers and body of an HTTP/1.1 response on a connection the server closes or sizes."""
    status_line = await reader.readline()
    if not status_line:
        return "closed", {}, b""
    status = int(status_line.split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return status, headers, body


async def slow_upload(host: str, port: int, path: str, hold_s: float) -> tuple:
    """Headers and 1,000 of 1,000,000 declared bytes, then nothing: what the server does about it within hold_s
    ("held": nothing, the connection still open)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {BODY_BYTES}\r\n\r\n"
    )
    return await exchange(host, port, head.encode() + b"\0" * 1000, hold_s, "held")


async def real_digits(
    host: str, port: int, path: str, digit: bytes, stop: threading.Event, report: Report, latencies: list
) -> None:
    """Real digits at REAL_RATE a second until stop is set, each on its own connection, as separate users. Run in a
    thread of its own with its own event loop, so the flood's loop, busy on the CPU, does not slow it down."""
    tasks = []

    async def one() -> None:
        started = time.monotonic()
        status, _, body = await request(host, port, path, digit, "image/png", 10)
        report.real_statuses[str(status)] = report.real_statuses.get(str(status), 0) + 1
        if status == 200 and json.loads(body).get("digit") == DIGIT_LABEL:
            report.real_right += 1
            latencies.append(time.monotonic() - started)

    next_send = time.monotonic()
    while not stop.is_set():
        tasks.append(asyncio.create_task(one()))
        report.real_sent += 1
        next_send += 1 / REAL_RATE
        await asyncio.sleep(max(0.0, next_send - time.monotonic()))
    await asyncio.gather(*tasks)


async def answer_after(host: str, port: int, path: str, digit: bytes, limit_s: float = 60) -> float | None:
    """Seconds from now until a real digit is answered right (None: not within limit_s)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        status, _, body = await request(host, port, path, digit, "image/png", 5)
        if status == 200 and json.loads(body).get("digit") == DIGIT_LABEL:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


async def flood(url: str, kind: str, count: int, hold_s: float, digit: Path = DIGIT) -> Report:
    parts = urlsplit(url)
    host, port, path = parts.hostname, parts.port or 80, parts.path
    report = Report(kind, count)
    stop = threading.Event()
    latencies: list[float] = []
    real_digit = digit.read_bytes()
    real = threading.Thread(
        target=lambda: asyncio.run(real_digits(host, port, path, real_digit, stop, report, latencies)), daemon=True
    )
    real.start()
    await asyncio.sleep(1)  # the real client is under way before the flood starts
    started = time.monotonic()
    if kind == "uploads":
        body = random.Random(0).randbytes(BODY_BYTES)
        deadline = started + UPLOADS_S

        async def uploader() -> list[tuple]:  # one upload after the other, until the deadline
            answers = [await request(host, port, path, body, "image/png", 60)]
            while time.monotonic() < deadline:
                answers.append(await request(host, port, path, body, "image/png", 60))
            return answers

        results = [
            answer for answers in await asyncio.gather(*(uploader() for _ in range(count))) for answer in answers
        ]
    else:
        results = await asyncio.gather(*(slow_upload(host, port, path, hold_s) for _ in range(count)))
    report.flood_seconds = round(time.monotonic() - started, 2)
    stop.set()
    real.join()
    report.flood_statuses = dict(Counter(str(status) for status, _, _ in results))
    report.flood_requests = len(results)
    report.retry_after_seen = any("retry-after" in headers for status, headers, _ in results if status in (429, 503))
    report.answer_after_s = await answer_after(host, port, path, real_digit)
    if report.answer_after_s is not None:
        report.answer_after_s = round(report.answer_after_s, 3)
    if latencies:
        latencies.sort()
        report.real_p99_s = round(latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)], 3)
    report.real_answered_share = round(report.real_right / report.real_sent, 3) if report.real_sent else 0.0
    return report


PLAN = (("uploads", 300), ("uploads", 1000), ("slow", 200))


def tree_rss(processes: list) -> int:
    """Resident bytes of these processes and all their children (a process that is gone counts 0)."""
    import psutil

    total = 0
    for process in processes:
        try:
            for member in [process, *process.children(recursive=True)]:
                total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakMemory:
    """The most resident memory PROCESSES (and their children) held while the with-block ran, sampled every 0.2 s."""

    def __init__(self, processes: list):
        self.processes = processes
        self.peak = tree_rss(processes)
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            self.peak = max(self.peak, tree_rss(self.processes))

    def __enter__(self) -> PeakMemory:
        self._sampler.start()
        return self

    def __exit__(self, *_) -> None:
        self._done.set()
        self._sampler.join()


def serve_and_flood(archive: Path, front_on: bool, plan, hold_s: float, digit: Path) -> list[dict]:
    """The server of `make serve` (or TorchServe alone) on free ports, each flood of plan against it in turn."""
    import tempfile

    import psutil

    from handler.server import Ports, ready, start_torchserve

    results = []
    with tempfile.TemporaryDirectory() as logs:
        with start_torchserve(archive, Path(logs), Ports.free(), front_on=front_on) as server:
            processes = [psutil.Process(server.process.pid)] + ([psutil.Process(server.front.pid)] if front_on else [])
            for kind, count in plan:  # each while the server still answers (the loop stops when it does not)
                with PeakMemory(processes) as memory:
                    report = asyncio.run(flood(server.url(), kind, count, hold_s, digit))
                alive = ready(server)  # answers /ping and a prediction (a launcher can outlive its JVM)
                results.append(
                    {
                        "server": "nginx + TorchServe" if front_on else "TorchServe alone",
                        **asdict(report),
                        "server_alive": alive,
                        "peak_rss_mb": round(memory.peak / 2**20),
                    }
                )
                if not alive:
                    break
    return results


def raise_open_files_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flood", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the prediction URL to flood (loopback, or the project's own test network)")
    where.add_argument("--archive", type=Path, help="start make serve's server on this .mar and flood it")
    parser.add_argument("--baseline", action="store_true", help="with --archive: flood TorchServe alone first")
    parser.add_argument(
        "--digit",
        type=Path,
        default=DIGIT,
        help=f"the real digit, a PNG of a {DIGIT_LABEL} (default: samples/digit-7.png)",
    )
    parser.add_argument(
        "--test-network",
        action="store_true",
        help="allow a --url off loopback: the project's own test network only (the kind smoke test's Service)",
    )
    parser.add_argument("--flood", choices=("uploads", "slow"), help="what to send (default: the three floods)")
    parser.add_argument("--count", type=int, help="with --flood: concurrent connections (1..2000)")
    parser.add_argument(
        "--hold", type=float, default=30.0, help="slow: seconds each slow upload waits for the server (default: 30)"
    )
    args = parser.parse_args(argv)
    if (args.flood is None) != (args.count is None):
        parser.error("--flood and --count go together")
    if args.count is not None and not 1 <= args.count <= 2000:
        parser.error(f"--count {args.count}: give 1 to 2000 connections")
    if args.url and urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1") and not args.test_network:
        parser.error(f"{args.url}: floods go to loopback only (--test-network for the project's own test network)")
    plan = [(args.flood, args.count)] if args.flood else list(PLAN)
    raise_open_files_limit(max(count for _, count in plan) + 256)
    if args.url:
        results = [asdict(asyncio.run(flood(args.url, kind, count, args.hold, args.digit))) for kind, count in plan]
    else:
        results = []
        for front_on in (False, True) if args.baseline else (True,):
            results += serve_and_flood(args.archive, front_on, plan, args.hold, args.digit)
    for result in results:
        print(json.dumps(result), flush=True)
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    """The figures beside the targets, for a reader (stderr; stdout has the JSON lines)."""
    say = functools.partial(print, file=sys.stderr)
    say(f"{'server':<20} {'flood':<13} {'flood answers':<28} {'digits 200':>10} {'p99 s':>6} {'after s':>8} alive")
    for r in results:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(r.get("flood_statuses", {}).items()))
        say(
            f"{r.get('server', ''):<20} {r['flood'] + ' ' + str(r['count']):<13} {statuses[:28]:<28} "
            f"{r.get('real_answered_share', 0):>10.1%} {r.get('real_p99_s') or '-':>6} "
            f"{r.get('answer_after_s') or 'none':>8} {r.get('server_alive', '')}"
        )
    say("targets: " + "; ".join(TARGETS.values()) + "; 0 restarts, memory under the pod's limit")


if __name__ == "__main__":
    sys.exit(main())
