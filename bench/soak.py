"""make soak: the served model under sustained load with malformed requests mixed in and a worker killed
under that load, then the model registry through a database restart; prints the figures beside the targets.

Load: one TorchServe on free loopback ports; wrk at 64 connections (one per wrk thread, so bench/wrk_soak.lua
can match each answer to its request), run once per minute back to back, so p99 is measured per minute (the
connections are opened anew each minute). One request in ten carries a malformed body, each kind in turn.
In the middle minute one worker is killed with SIGKILL. Memory (RSS) of the frontend and of every worker is
read after a warm-up and at the end, and its peak is sampled throughout.

Registry: on a Cassandra node of its own (scratch_node(): other ports and directories, the shared jars; the
shared node on 9042 is never touched), `mnist-registry download` while the node is down (it retries, then
fails in one line), a download started while it is down that succeeds once the node is back, and a publish
cut off by the node stopping mid-way, after which `mnist-registry list` shows no such version and the same
version publishes cleanly.

The whole run is bounded (--minutes plus 15 minutes) and everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bench.big_archive import big_archive
from bench.serve import MemoryPeaks, digit_images, load_line, verdict, write_pngs
from handler.client import encoded
from handler.server import DEFAULT_ARCHIVE, Ports, Server, start_torchserve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from cassandra_node import CassandraNode, scratch_node  # noqa: E402 (scripts/cassandra_node.py)

WRK_SCRIPT = Path(__file__).with_name("wrk_soak.lua")
DIGIT_COUNT = 100
WARM_UP_S = 10
KILL_AFTER_S = 20  # into the kill minute
RECOVERED = 0.9  # throughput back to this share of the rate before the kill
SLACK_S = 15 * 60  # the bound beyond the minutes of load: TorchServe's start, warm-up, the registry phase
# The targets ("zero 5xx", "zero dropped connections" are zeros).
TARGET_P99_SPREAD = 2.0  # "p99 stable": the worst minute's p99 at most twice the best's
TARGET_RSS_GROWTH = 0.10  # "memory flat": no process more than 10 % above its size after the warm-up


# --- load --------------------------------------------------------------------------------------


def malformed(png: bytes) -> dict[str, tuple[bytes, str, int]]:
    """The malformed requests mixed into the load, built around one digit's PNG: kind -> (body, Content-Type,
    the status the server answers). tests/test_reliability.py sends the same ones."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("digit.png", png)
    return {
        "empty": (b"", "application/octet-stream", 400),
        "plain-text": (b"what digit is this?", "text/plain", 415),
        "truncated-png": (png[: len(png) // 2], "image/png", 400),
        "zip": (archive.getvalue(), "application/zip", 415),
        "wrong-shape": (json.dumps([[0] * 28] * 27).encode(), "application/json", 400),
        "out-of-range": (json.dumps([0] * 783 + [256]).encode(), "application/json", 400),
        "invalid-json": (b'{"data": ', "application/json", 400),
        # Refused by TorchServe's frontend before any worker sees it (max_request_size).
        "over-1-mib": (b"\x89PNG" + bytes(1 << 20), "image/png", 413),
    }


def wrk_arguments(directory: Path) -> list[str]:
    """The files wrk_soak.lua sends, written into `directory`: digit PNGs, then KIND|CONTENT-TYPE|PATH per
    malformed kind."""
    images, _ = digit_images(DIGIT_COUNT)
    arguments = [str(path) for path in write_pngs(images, directory)]
    for kind, (body, content_type, _) in malformed(encoded(images[0])).items():
        path = directory / f"bad-{kind}"
        path.write_bytes(body)
        arguments.append(f"{kind}|{content_type}|{path}")
    return arguments


def run_wrk(url: str, files: list[str], bad_every: int, connections: int, seconds: float) -> dict:
    command = [
        "wrk",
        f"-t{connections}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        str(bad_every),
        *files,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # the line wrk_soak.lua's done() prints


@dataclass
class Minute:
    number: int
    wrk: dict  # the JSON line of wrk_soak.lua
    killed_at: float | None = None  # epoch seconds of the worker kill in this minute

    def count(self, kind: str, what: str) -> int:
        """what: sent, 2xx, 4xx, 5xx, other, unanswered; kind: good, bad (every malformed kind) or one kind."""
        counts = self.wrk["counts"]
        if kind == "bad":
            return sum(n for key, n in counts.items() if key.endswith(f" {what}") and not key.startswith("good "))
        return counts.get(f"{kind} {what}", 0)

    def answered(self, kind: str) -> int:
        """Requests of `kind` with an answer: those in flight when wrk stopped are left out."""
        return self.count(kind, "sent") - self.count(kind, "unanswered")

    def failed(self, kind: str) -> int:
        """Requests of `kind` answered other than their kind should be: a digit 2xx, a malformed body 4xx."""
        expected = "2xx" if kind == "good" else "4xx"
        return sum(self.count(kind, status) for status in ("2xx", "4xx", "5xx", "other")) - self.count(kind, expected)

    @property
    def five_xx(self) -> int:
        return sum(n for key, n in self.wrk["counts"].items() if key.endswith(" 5xx"))

    @property
    def dropped(self) -> int:
        return sum(self.wrk[key] for key in ("connect", "read", "write", "timeout"))

    @property
    def rate(self) -> float:
        return self.wrk["requests"] / self.wrk["seconds"]


def kill_a_worker(server: Server) -> float:
    server.workers()[0].send_signal(signal.SIGKILL)
    return time.time()


def recovery(ok_per_second: dict[str, int], killed_at: float) -> tuple[float, int, int | None]:
    """The 2xx rate before the kill, the lowest second after it, and the whole seconds from the kill until a
    second reaches RECOVERED of that rate again (None: not within the minute)."""
    counts = {int(second): count for second, count in ok_per_second.items()}
    kill_second = int(killed_at)
    before = [counts[s] for s in sorted(counts) if s < kill_second][1:]  # the first second is a partial one
    after = [s for s in sorted(counts) if s > kill_second][:-1]  # and so is the last
    rate = statistics.mean(before)
    lowest = min(counts.get(s, 0) for s in range(kill_second, after[-1] + 1)) if after else 0
    back = next((s - kill_second for s in after if counts[s] >= RECOVERED * rate), None)
    return rate, lowest, back


def mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def sizes(server: Server) -> dict[str, int]:
    """RSS in bytes by process, named as MemoryPeaks names them; a killed worker's replacement has another pid."""
    found = {"frontend (JVM)": server.frontend().memory_info().rss}
    for worker in server.workers():
        found[f"worker {worker.pid}"] = worker.memory_info().rss
    return found


def soak(archive: Path, logs: Path, minutes: int, connections: int, bad_share: float, kill_minute: int) -> bool:
    bad_every = max(2, round(1 / bad_share))
    results: list[Minute] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        files = wrk_arguments(Path(tmp))
        kinds = [argument.split("|")[0] for argument in files if "|" in argument]
        with start_torchserve(archive, logs, Ports.free()) as server:
            run_wrk(server.url(), files, bad_every, connections, WARM_UP_S)  # the JVM's JIT and the workers warm up
            start_sizes = sizes(server)
            print(
                f"TorchServe up on 127.0.0.1:{server.ports.inference}, warmed up for {WARM_UP_S} s. "
                f"{minutes} runs of wrk, 60 s each, at {connections} connections; "
                f"1 request in {bad_every} malformed ({', '.join(kinds)}); "
                f"a worker killed {KILL_AFTER_S} s into minute {kill_minute or '-'}.\n"
            )
            print(
                f"{'minute':>6} {'digits':>10} {'2xx':>9} {'failed':>6} {'malformed':>9} {'4xx':>7} {'failed':>6} "
                f"{'5xx':>4} {'dropped':>7} {'req/s':>6} {'p50 ms':>6} {'p99 ms':>6} {'max ms':>6}"
            )
            with MemoryPeaks(server) as memory:
                for number in range(1, minutes + 1):
                    killed: list[float] = []
                    timer = (
                        threading.Timer(KILL_AFTER_S, lambda killed=killed: killed.append(kill_a_worker(server)))
                        if number == kill_minute
                        else None
                    )
                    if timer:
                        timer.start()
                    figures = run_wrk(server.url(), files, bad_every, connections, 60)
                    if timer:
                        timer.join()
                    minute = Minute(number, figures, killed[0] if killed else None)
                    results.append(minute)
                    print(
                        f"{number:>6} {minute.answered('good'):>10,} {minute.count('good', '2xx'):>9,} "
                        f"{minute.failed('good'):>6,} {minute.answered('bad'):>9,} {minute.count('bad', '4xx'):>7,} "
                        f"{sum(minute.failed(k) for k in kinds):>6,} {minute.five_xx:>4,} {minute.dropped:>7,} "
                        f"{minute.rate:>6,.0f} {figures['p50_ms']:>6.1f} {figures['p99_ms']:>6.1f} "
                        f"{figures['max_ms']:>6.0f}" + ("   <- worker killed" if killed else ""),
                        flush=True,
                    )
                end_sizes = sizes(server)
    return report_load(results, kinds, start_sizes, end_sizes, memory.peaks)


def report_load(
    results: list[Minute], kinds: list[str], start: dict[str, int], end: dict[str, int], peaks: dict[str, int]
) -> bool:
    steady = [m for m in results if m.killed_at is None]
    killed = [m for m in results if m.killed_at is not None]
    unanswered = max(m.count("good", "unanswered") + m.count("bad", "unanswered") for m in results)
    resent = sum(m.wrk["resent"] for m in results)
    print(
        "(requests answered; failed: a digit answered other than 2xx, a malformed body other than 4xx, each answer "
        f"matched to its request. Left out: at most {unanswered} a minute in flight when wrk stopped. {resent} were "
        "sent again because no answer came: a dropped connection, or a first write that could not start)"
    )

    print(f"\n{'malformed kind':<16} {'answered':>8} {'4xx':>7} {'other':>6}   (all minutes)")
    for kind in kinds:
        answered, failed = sum(m.answered(kind) for m in results), sum(m.failed(kind) for m in results)
        print(f"{kind:<16} {answered:>8,} {sum(m.count(kind, '4xx') for m in results):>7,} {failed:>6,}")

    print("\nmemory (RSS): after the warm-up -> at the end (peak)")
    growth = {name: end[name] / start[name] - 1 for name in start if name in end}
    for name in start:
        after = f"{mib(end[name])} ({growth[name]:+.1%})" if name in end else "killed"
        print(f"  {name:<16} {mib(start[name]):>8} -> {after:<20} (peak {mib(peaks.get(name, start[name]))})")
    for name in end.keys() - start.keys():
        print(
            f"  {name:<16} {'(new)':>8} -> {mib(end[name]):<20} (peak {mib(peaks.get(name, end[name]))})   "
            "the killed worker's replacement"
        )

    good_failed = sum(m.failed("good") for m in steady)
    bad_failed = sum(m.failed(kind) for m in steady for kind in kinds)
    five_xx = sum(m.five_xx for m in steady)
    dropped = sum(m.dropped for m in steady)
    p99s = [m.wrk["p99_ms"] for m in steady]
    spread = max(p99s) / min(p99s)
    worst_growth = max(growth.values())
    checks = [
        ("good requests without a 2xx", f"{good_failed}", "0", good_failed == 0),
        ("malformed requests without a 4xx", f"{bad_failed}", "0", bad_failed == 0),
        ("5xx answers", f"{five_xx}", "0", five_xx == 0),
        ("dropped connections (socket errors, timeouts)", f"{dropped}", "0", dropped == 0),
        (
            "p99 per minute, worst / best",
            f"{max(p99s):.1f} / {min(p99s):.1f} ms = {spread:.2f}",
            f"<= {TARGET_P99_SPREAD:g}",
            spread <= TARGET_P99_SPREAD,
        ),
        (
            "largest RSS growth of a process",
            f"{worst_growth:+.1%}",
            f"<= {TARGET_RSS_GROWTH:+.0%}",
            worst_growth <= TARGET_RSS_GROWTH,
        ),
    ]
    for minute in killed:
        rate, lowest, back = recovery(minute.wrk["ok_per_second"], minute.killed_at)
        failed = sum(minute.failed(kind) for kind in ["good", *kinds])
        print(
            f"\nworker kill (minute {minute.number}, SIGKILL {KILL_AFTER_S} s in): {failed} requests failed "
            f"({minute.five_xx} answered 5xx), {minute.dropped} dropped connections; 2xx rate before the kill "
            f"{rate:,.0f}/s, lowest second after it {lowest:,}/s, back to {RECOVERED:.0%} of the rate "
            f"{f'{back} s' if back is not None else 'not within the minute'} after the kill (whole seconds)"
        )
        checks.append(
            (
                f"throughput back to {RECOVERED:.0%} after the worker kill",
                f"{back} s" if back is not None else "no",
                "within the minute",
                back is not None,
            )
        )

    print(f"\n{'check (minutes without the kill; memory over all)':<50} {'measured':<30} target")
    for name, measured, target, met in checks:
        print(f"{name:<50} {measured:<30} {target}  {verdict(met)}")
    return all(met for *_, met in checks)


# --- the registry through a database restart -----------------------------------------------------


def registry(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "registry.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class RestartFigures:
    failed_download: subprocess.CompletedProcess  # with the node down and a short retry budget
    failed_after_s: float
    restart_s: float  # the node's start, until it answers CQL
    recovered_download: subprocess.CompletedProcess  # started while the node was down
    recovered_after_s: float  # from the download's start
    recovered_after_up_s: float  # from the node answering again
    interrupted_after_chunks: int  # chunks written when the node had stopped
    interrupted_of_chunks: int
    interrupted_error: str
    listed_after_interruption: subprocess.CompletedProcess  # mnist-registry list
    republished: subprocess.CompletedProcess


def registry_through_a_restart(
    node: CassandraNode, keyspace: str, archive: Path, metrics: Path, work: Path, retry_s: float = 6
) -> RestartFigures:
    """On a running `node`: publish `archive` as version "1" in `keyspace`, then the three restarts; the node is up at
    the end."""
    from registry import db
    from registry.settings import cassandra_settings
    from registry.store import Registry, chunk_count, read_metrics

    env = {**node.env, "CASSANDRA_KEYSPACE": keyspace, "CASSANDRA_CONNECT_TIMEOUT": "2"}
    published = registry(env, "publish", str(archive), "--metrics", str(metrics), "--version", "1")
    if published.returncode != 0:
        raise RuntimeError(f"mnist-registry publish failed: {published.stderr}")

    node.down()
    started = time.monotonic()
    failed = registry(env, "download", "1", "--out", str(work / "while-down"), "--retry-seconds", f"{retry_s:g}")
    failed_after = time.monotonic() - started

    started = time.monotonic()
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "registry.cli",
            "download",
            "1",
            "--out",
            str(work / "after-restart"),
            "--retry-seconds",
            "120",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The node starts only once the download has failed a first time, however slowly a busy machine starts it.
    before = ""
    while "attempt 1 failed" not in before and (line := waiting.stderr.readline()):
        before += line
    restart = node.up()
    answering = time.monotonic()
    out, err = waiting.communicate(timeout=180)
    finished = time.monotonic()
    recovered = subprocess.CompletedProcess(waiting.args, waiting.returncode, out, before + err)

    # A publish the database stops under: the node is stopped from the publish's own progress callback after
    # its first chunk, so the cut falls mid-publish every time, with more chunks in flight.
    big = big_archive(work / "big.mar", 32)
    written = {"chunks": 0}

    def stop_after_first_chunk(_: int) -> None:
        written["chunks"] += 1
        if written["chunks"] == 1:
            node.down()

    error = ""
    try:
        with db.connect(cassandra_settings(env)) as session:
            Registry(session).publish(big, read_metrics(metrics), "big", on_bytes=stop_after_first_chunk)
    except db.DatabaseError as raised:
        error = str(raised)
    node.up()
    listed = registry(env, "list")
    republished = registry(env, "publish", str(big), "--metrics", str(metrics), "--version", "big")
    return RestartFigures(
        failed,
        failed_after,
        restart,
        recovered,
        finished - started,
        finished - answering,
        written["chunks"],
        chunk_count(big.stat().st_size),
        error,
        listed,
        republished,
    )


def listed_versions(listed: subprocess.CompletedProcess) -> list[str]:
    """The VERSION column of `mnist-registry list`."""
    return [line.split()[0] for line in listed.stdout.splitlines()[1:]]


def report_registry(figures: RestartFigures, retry_s: float) -> bool:
    f = figures
    attempts = f.failed_download.stderr.count("attempt ")
    last = f.failed_download.stderr.strip().splitlines()[-1] if f.failed_download.stderr.strip() else ""
    retries = f.recovered_download.stderr.count("attempt ")
    versions = listed_versions(f.listed_after_interruption)
    print(
        f"\nnode down: `mnist-registry download 1 --retry-seconds {retry_s:g}` tried {attempts + 1} times "
        f"(one stderr line each), exit {f.failed_download.returncode} after {f.failed_after_s:.1f} s with:\n  {last}"
    )
    print(
        f"restart: a download started with the node down retried {retries} times; the node took {f.restart_s:.1f} s "
        f"to answer; the download exited {f.recovered_download.returncode} {f.recovered_after_up_s:.1f} s after that "
        f"({f.recovered_after_s:.1f} s after it began): {f.recovered_download.stdout.strip()}"
    )
    print(
        f"publish cut off by the node stopping, after {f.interrupted_after_chunks} of {f.interrupted_of_chunks} "
        "chunks: "
        f"{'error: ' + f.interrupted_error[:160] if f.interrupted_error else 'NO ERROR'}; "
        f"after the restart `mnist-registry list` shows versions {', '.join(versions) or 'none'}; "
        f"the same version published again: exit {f.republished.returncode}"
    )
    checks = [
        (
            "download with the node down retries, then fails in one error line",
            attempts >= 2 and f.failed_download.returncode == 1 and last.startswith("error: "),
        ),
        ("download across the restart succeeds", f.recovered_download.returncode == 0),
        ("the interrupted publish failed and left no visible version", bool(f.interrupted_error) and versions == ["1"]),
        ("the same version publishes afterwards", f.republished.returncode == 0),
    ]
    for name, met in checks:
        print(f"  {name:<70} {verdict(met)}")
    return all(met for _, met in checks)


def registry_phase(archive: Path, metrics: Path) -> bool:
    print(
        "\nthe registry through a database restart, on a Cassandra node of its own at "
        f"127.0.0.1:{CassandraNode.port} (the shared node is not touched); starting it...",
        flush=True,
    )
    with scratch_node() as node, tempfile.TemporaryDirectory(prefix="soak-registry-") as tmp:
        retry_s = 6
        figures = registry_through_a_restart(node, "soak", archive, metrics, Path(tmp), retry_s)
        return report_registry(figures, retry_s)


def out_of_time(signum, frame) -> None:
    raise TimeoutError(
        "the soak went over its time bound; stopped (TorchServe and the scratch node are stopped on the way out)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--archive",
        type=Path,
        default=DEFAULT_ARCHIVE,
        help="model archive (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics",
        type=Path,
        default=Path("artifacts/metrics.json"),
        help="its metrics.json, for the registry phase (default: %(default)s)",
    )
    parser.add_argument("--minutes", type=int, default=5, help="minutes of load (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections (default: %(default)s)")
    parser.add_argument(
        "--bad-share", type=float, default=0.10, help="share of malformed requests (default: %(default)s)"
    )
    parser.add_argument(
        "--kill-minute", type=int, help="minute in which a worker is killed (default: the middle one; 0: none)"
    )
    parser.add_argument("--skip-load", action="store_true", help="only the registry phase")
    parser.add_argument("--skip-registry", action="store_true", help="only the load phase")
    parser.add_argument(
        "--logs", type=Path, default=Path("artifacts/logs/soak"), help="TorchServe's logs (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    kill_minute = args.minutes // 2 + 1 if args.kill_minute is None else args.kill_minute
    if (
        args.minutes < 2
        or not 0 < args.bad_share <= 0.5
        or args.connections < 1
        or not 0 <= kill_minute <= args.minutes
    ):
        parser.error(
            "--minutes must be at least 2 (one with the kill, one without), --bad-share in (0, 0.5], "
            "--connections at least 1, --kill-minute within the minutes"
        )
    if not args.skip_load and not shutil.which("wrk"):
        print("error: wrk is not installed; scripts/with-wrk.sh installs it (apt-get install wrk)", file=sys.stderr)
        return 1
    if not args.skip_registry and not args.metrics.is_file():
        print(
            f"error: {args.metrics}: no such file; the registry phase publishes the archive with its metrics "
            "(make train writes them)",
            file=sys.stderr,
        )
        return 1
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(args.minutes * 60 + SLACK_S)
    print(f"before: {load_line()}")
    ok = True
    if not args.skip_load:
        ok &= soak(args.archive, args.logs, args.minutes, args.connections, args.bad_share, kill_minute)
    if not args.skip_registry:
        ok &= registry_phase(args.archive, args.metrics)
    print(f"\nafter: {load_line()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
