"""Benchmark the served model with wrk beside its peer, KServe's model server running the same model with the
same decoding, beside the server as it was before nginx went in front, and beside the model in-process; print the
figures, the server CPU per request and the targets."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from handler import inputs
from handler.archive import MODEL_CONFIG, MODEL_NAME
from handler.client import encoded
from handler.mnist_handler import answer, load_models
from handler.server import CONFIG, DEFAULT_ARCHIVE, Ports, Server, start_torchserve, stop
from registry.model_archive import manifest_of

ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = Path(__file__).with_name("wrk_post.lua")
LEVELS = (1, 16, 64)  # concurrent connections
DIGIT_COUNT = 100  # different test digits the requests rotate through
WARM_UP_S = 10
# The targets, on 2 cores with the load generator on the same cores.
TARGET_RPS = 3000  # at the highest level
TARGET_P99_MS = 50.0
TARGET_RATIO = 0.75  # served req/s over in-process batch-1 img/s
# At one connection (a quiet endpoint), and over the peer at the highest level.
TARGET_LONE_P50_MS = 1.5
TARGET_LONE_RPS = 600
TARGET_LONE_CPU_MS = 1.5
TARGET_OVER_PEER = 2.0
KSERVE_VERSION = "0.21.0"  # scripts/kserve.lock
# The serving stack before nginx went in front of TorchServe: its handler served by TorchServe alone. Throughput
# with nginx must stay within 5 % of it.
BEFORE_NGINX = "f4260e4"
TARGET_KEPT = 0.95
# TorchServe's stock MNIST example on this kind of machine (shared/infra-recipes.md), for scale.
STOCK_EXAMPLE = "stock TorchServe MNIST example: 70 req/s at 16 connections, p99 476 ms"


@dataclass
class Level:
    connections: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms: float = math.nan  # server CPU time per request (all its processes)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


@dataclass
class MemoryPeaks:
    """Peak resident memory per process of a running server, sampled in a background thread; and the
    peak of their summed proportional set size (PSS: pages the workers share, such as torch's
    libraries, counted once), which is what a container's memory limit has to cover."""

    server: Server
    interval: float = 0.2
    pss_every: int = 5  # reading PSS walks /proc/PID/smaps: every 5th sample only
    peaks: dict[str, int] = field(default_factory=dict)  # "frontend (JVM)" / "worker <pid>" -> bytes
    peak_pss: int = 0

    def __enter__(self) -> MemoryPeaks:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        sample = 0
        while not self._stop.wait(self.interval):
            sample += 1
            try:
                frontend = self.server.frontend()
                processes = [("frontend (JVM)", frontend)] + [(f"worker {w.pid}", w) for w in self.server.workers()]
                for name, process in processes:
                    self.peaks[name] = max(self.peaks.get(name, 0), process.memory_info().rss)
                if sample % self.pss_every == 0:
                    self.peak_pss = max(self.peak_pss, sum(process.memory_full_info().pss for _, process in processes))
            except psutil.Error:  # a process ended between listing and reading it
                continue


def digit_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` MNIST test digits (28 x 28 uint8) and their labels."""
    from training.data import load_mnist  # the 10,000 test digits, fetched once and cached

    mnist = load_mnist()
    return mnist.test_images[:count], mnist.test_labels[:count]


def write_pngs(images: np.ndarray, directory: Path) -> list[Path]:
    paths = []
    for number, image in enumerate(images):
        path = directory / f"{number:04d}.png"
        path.write_bytes(encoded(image))
        paths.append(path)
    return paths


def load_model(archive: Path, directory: Path) -> torch.jit.ScriptModule:
    """The TorchScript model inside the archive (exactly what the workers serve), unpacked into directory."""
    from training.export import load  # torch.jit.load without its deprecation warning

    with zipfile.ZipFile(archive) as mar:
        serialized = manifest_of(mar)["model"]["serializedFile"]
        path = directory / "model.pt"
        path.write_bytes(mar.read(serialized))
    return load(path)


def rate(work, items: list, seconds: float) -> float:
    """Calls of work(item) per second, cycling through items for about `seconds`."""
    for item in items[:20]:  # TorchScript profiles the first runs and optimises after them
        work(item)
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for item in items:
            work(item)
        done += len(items)
    return done / elapsed


def in_process_rates(
    model: torch.jit.ScriptModule,
    images: np.ndarray,
    pngs: list[bytes],
    seconds: float,
) -> tuple[float, float]:
    """Images per second on one thread, batch 1: the model alone, and a worker's whole path
    (decode the PNG, forward pass, softmax, answer JSON)."""
    torch.set_num_threads(1)  # as each worker runs
    tensors = list(torch.from_numpy(images.copy()).unsqueeze(1).split(1))  # copy: the cached arrays are read-only

    def forward(pixels: torch.Tensor) -> None:
        with torch.inference_mode():
            model(pixels)

    def whole_path(png: bytes) -> None:
        pixels = torch.from_numpy(inputs.decode_request(png).images).unsqueeze(1)
        with torch.inference_mode():
            probabilities = torch.softmax(model(pixels), dim=1).numpy()
        json.dumps(answer(probabilities[0]))

    return rate(forward, tensors, seconds), rate(whole_path, pngs, seconds)


def batch_rates(model: Path, images: np.ndarray, sizes: tuple[int, ...], seconds: float) -> list[tuple[float, float]]:
    """Images per second on one thread at each batch size: the model as saved, and the copy the handler runs
    batches through (mnist_handler.load_models)."""
    torch.set_num_threads(1)
    modules = load_models(str(model), torch.device("cpu"))
    pixels = torch.from_numpy(images.copy()).unsqueeze(1)

    def images_per_second(module: torch.jit.ScriptModule, size: int) -> float:
        def forward(batch: torch.Tensor) -> None:
            with torch.inference_mode():
                module(batch)

        return size * rate(forward, list(pixels.split(size)), seconds)

    return [tuple(images_per_second(module, size) for module in modules) for size in sizes]


def figures(rates: tuple[float, ...]) -> str:
    return " / ".join(f"{rate:,.0f}" for rate in rates)


def run_wrk(url: str, files: list[Path], connections: int, seconds: float) -> Level:
    command = [
        "wrk",
        f"-t{min(2, connections)}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        *map(str, files),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])  # the line wrk_post.lua's done() prints
    errors = sum(figures[key] for key in ("connect", "read", "write", "status", "timeout"))
    return Level(connections, figures["requests"], figures["seconds"], figures["p50_ms"], figures["p99_ms"], errors)


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU time the processes have used so far."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):  # a process ended between listing and reading it
            times = process.cpu_times()
            total += times.user + times.system
    return total


@dataclass
class Contender:
    """A server under test: its URL and the processes whose CPU time its answers cost."""

    name: str
    url: str
    processes: Callable[[], list[psutil.Process]]
    levels: dict[int, list[Level]] = field(default_factory=dict)  # connections -> one Level per round

    def measure(self, files: list[Path], connections: int, seconds: float) -> Level:
        processes = self.processes()
        before = cpu_seconds(processes)
        level = run_wrk(self.url, files, connections, seconds)
        level.cpu_ms = (cpu_seconds(processes) - before) * 1000 / max(level.requests, 1)
        self.levels.setdefault(connections, []).append(level)
        return level

    def mean(self, connections: int, figure: str) -> float:
        return statistics.fmean(getattr(level, figure) for level in self.levels[connections])


def processes_of(server: Server) -> Callable[[], list[psutil.Process]]:
    """The server's processes as they are at each call (workers restart and change pid): TorchServe's, and nginx's
    master and worker when it is in front."""

    def processes() -> list[psutil.Process]:
        front = psutil.Process(server.front.pid) if server.front else None
        return [server.frontend(), *server.workers(), *([front, *front.children()] if front else [])]

    return processes


@contextlib.contextmanager
def kserve_peer(model: Path, workers: int, log: Path) -> Iterator[Contender]:
    """KServe's model server (scripts/kserve-venv.sh) serving `model` with handler/inputs.py's decoding."""
    made = subprocess.run([str(ROOT / "scripts" / "kserve-venv.sh")], check=True, capture_output=True, text=True)
    venv = Path(made.stdout.strip())
    ports = Ports.free()  # distinct ports for its HTTP and gRPC listeners
    port, grpc_port = ports.inference, ports.grpc_inference
    command = [
        str(venv / "bin" / "python"),
        "-m",
        "bench.kserve_peer",
        "--model",
        str(model),
        "--http_port",
        str(port),
        "--grpc_port",
        str(grpc_port),
        "--workers",
        str(workers),
        # gRPC off and no latency line per request: what a REST deployment of it would run.
        "--enable_grpc",
        "false",
        "--enable_latency_logging",
        "false",
    ]
    environment = {**os.environ, "PROJECT_SITE_PACKAGES": sysconfig.get_paths()["purelib"], "OMP_NUM_THREADS": "1"}
    with log.open("ab") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{base}/v1/models/{MODEL_NAME}", process, log)
        root = psutil.Process(process.pid)
        yield Contender(
            f"KServe {KSERVE_VERSION}, {workers} worker{'s' * (workers > 1)}",
            f"{base}/v1/models/{MODEL_NAME}:predict",
            lambda: [root, *root.children(recursive=True)],
        )
    finally:
        stop(process)


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the KServe peer exited ({process.returncode}); its log, {log}, ends:\n{log.read_text()[-2000:]}"
            )
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as answer:
                if json.loads(answer.read()).get("ready"):
                    return
        time.sleep(0.5)
    raise RuntimeError(f"the KServe peer did not get ready in {timeout:.0f} s; see {log}")


def null_archive(directory: Path) -> Path:
    """An archive whose handler does nothing (a fixed answer), with our batch and worker settings:
    what TorchServe itself costs per request, the floor under any handler."""
    handler = directory / "null_handler.py"
    handler.write_text(
        "def handle(data, context):\n    return None if data is None else ['{\"digit\": 0}'] * len(data)\n"
    )
    store = directory / "null-store"
    store.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            MODEL_NAME,
            "--version",
            "1",
            "--handler",
            str(handler),
            "--config-file",
            str(MODEL_CONFIG),
            "--export-path",
            str(store),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "TMPDIR": str(directory)},
    )
    return store / f"{MODEL_NAME}.mar"


def archive_at(revision: str, model: Path, directory: Path) -> Path:
    """`model` packed with the handler of an earlier commit, by that commit's own handler/archive.py: the
    server as it was then, to measure today's against."""
    exported = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "handler"], capture_output=True)
    if exported.returncode != 0:
        raise RuntimeError(
            f"--baseline {revision}: not in this checkout's history ({exported.stderr.decode().strip()}); "
            "measure from a full clone"
        )
    tree = directory / f"handler-{revision}"
    with tarfile.open(fileobj=io.BytesIO(exported.stdout)) as files:
        files.extractall(tree, filter="data")
    store = directory / f"store-{revision}"
    # Run from the exported tree, so `handler` is that commit's package, not today's.
    subprocess.run(
        [sys.executable, "-m", "handler.archive", "--model", str(model), "--version", revision, "--out", str(store)],
        cwd=tree,
        check=True,
        capture_output=True,
    )
    return store / f"{MODEL_NAME}.mar"


def jvm_heap(config: Path = CONFIG) -> str:
    for line in config.read_text().splitlines():
        if line.startswith("vmargs="):
            return " ".join(arg for arg in line.split("=", 1)[1].split() if arg.startswith(("-Xms", "-Xmx")))
    return "JVM default (a quarter of RAM)"


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def warm_up(url: str, files: list[Path], connections: int, seconds: float) -> None:
    """Load until the JVM's compiler has settled (it still compiled a second of CPU time in the
    10 s after a 3 s warm-up), then a lone connection's path."""
    run_wrk(url, files, connections, min(WARM_UP_S, seconds))
    run_wrk(url, files, 1, min(3, seconds))


def measure_side_by_side(
    contenders: list[Contender], files: list[Path], levels: list[int], seconds: float, rounds: int = 2
) -> None:
    """Each level for each contender, in rounds of alternating order, so a drift of the machine
    during the run (another process, a warmer cache) falls on all alike."""
    for contender in contenders:  # JIT and caches warm, for every server alike
        warm_up(contender.url, files, max(levels), seconds)
    for order in (contenders if round_ % 2 == 0 else contenders[::-1] for round_ in range(rounds)):
        for connections in levels:
            for contender in order:
                level = contender.measure(files, connections, seconds)
                print(
                    f"  {contender.name:<34} {connections:>3} connections: {level.rate:>6,.0f} req/s, "
                    f"p50 {level.p50_ms:5.2f} ms, p99 {level.p99_ms:6.2f} ms, CPU {level.cpu_ms:.2f} ms/request",
                    flush=True,
                )


def print_table(contenders: list[Contender], levels: list[int]) -> None:
    """Every contender at every level; ours first and the peer last."""
    ours, peer = contenders[0], contenders[-1]
    print()
    print("mean of the rounds (req/s: round 1 / round 2 / ...)")
    print(
        f"{'connections':>11}  {'server':<34} {'req/s':>15}  {'p50 ms':>6}  {'p99 ms':>6}  {'CPU ms/req':>10}  "
        f"{'errors':>6}"
    )
    for connections in levels:
        for contender in contenders:
            rounds = figures(tuple(level.rate for level in contender.levels[connections]))
            errors = sum(level.errors for level in contender.levels[connections])
            p50, p99, cpu = (contender.mean(connections, figure) for figure in ("p50_ms", "p99_ms", "cpu_ms"))
            print(
                f"{connections:>11}  {contender.name:<34} {rounds:>15}  {p50:>6.2f}  {p99:>6.2f}  {cpu:>10.2f}  "
                f"{errors:>6}"
            )
        ratio = ours.mean(connections, "rate") / peer.mean(connections, "rate")
        print(f"{'':>11}  {'ours / peer':<34} {ratio:>14.2f}x")


def print_targets(ours: Contender, peer: Contender, forward_rate: float, levels: list[int]) -> None:
    top, lone = max(levels), min(levels)
    rate, over_peer = ours.mean(top, "rate"), ours.mean(top, "rate") / peer.mean(top, "rate")
    errors = sum(level.errors for levels_ in ours.levels.values() for level in levels_)
    print()
    print(f"targets (set for 2 cores with the load generator on them; here {os.cpu_count()} cores), on the means:")
    lone_p50, lone_rate, lone_cpu = (ours.mean(lone, figure) for figure in ("p50_ms", "rate", "cpu_ms"))
    top_p99 = ours.mean(top, "p99_ms")
    for target, figure, met in (
        (f"{lone} connection: p50 <= {TARGET_LONE_P50_MS:g} ms", f"{lone_p50:.2f} ms", lone_p50 <= TARGET_LONE_P50_MS),
        (f"{lone} connection: >= {TARGET_LONE_RPS} req/s", f"{lone_rate:,.0f} req/s", lone_rate >= TARGET_LONE_RPS),
        (
            f"{lone} connection: CPU <= {TARGET_LONE_CPU_MS:g} ms/request",
            f"{lone_cpu:.2f} ms",
            lone_cpu <= TARGET_LONE_CPU_MS,
        ),
        (
            f"{top} connections: >= {TARGET_OVER_PEER:g} x the peer's req/s",
            f"{over_peer:.2f} x",
            over_peer >= TARGET_OVER_PEER,
        ),
        (f"{top} connections: >= {TARGET_RPS:,} req/s", f"{rate:,.0f} req/s", rate >= TARGET_RPS),
        (f"{top} connections: p99 <= {TARGET_P99_MS:g} ms", f"{top_p99:.1f} ms", top_p99 <= TARGET_P99_MS),
        (
            f"served >= {TARGET_RATIO} x in-process batch 1",
            f"{rate / forward_rate:.2f} x ({rate:,.0f} / {forward_rate:,.0f})",
            rate >= TARGET_RATIO * forward_rate,
        ),
        ("0 errors, every level", f"{errors} errors", errors == 0),
    ):
        print(f"  {target:<42} {figure:<28} {verdict(met)}")
    print(f"reference: {STOCK_EXAMPLE}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__)
    parser.add_argument(
        "--archive",
        type=Path,
        default=DEFAULT_ARCHIVE,
        help="model archive (default: %(default)s)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=15.0,
        help="duration of each load level, per server and round (default: %(default)s)",
    )
    parser.add_argument(
        "--connections",
        type=lambda text: [int(n) for n in text.split(",")],
        default=list(LEVELS),
        help="load levels (default: 1,16,64)",
    )
    parser.add_argument(
        "--peer-workers", type=int, default=2, help="KServe worker processes (default: %(default)s, as many as ours)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds over all servers and levels, in alternating order (default: %(default)s); more rounds of fewer "
        "seconds average out a machine whose speed drifts",
    )
    parser.add_argument(
        "--baseline",
        default=BEFORE_NGINX,
        help="the commit whose handler, served by TorchServe alone, is the stack to keep within 5%% of "
        "(default: %(default)s, the last one before nginx went in front)",
    )
    parser.add_argument(
        "--logs", type=Path, default=Path("artifacts/logs/bench"), help="the servers' logs (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    if not shutil.which("wrk"):
        print("error: wrk is not installed; scripts/with-wrk.sh installs it (apt-get install wrk)", file=sys.stderr)
        return 1

    print(f"before: {load_line()}")
    images, _ = digit_images(DIGIT_COUNT)
    args.logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        files = write_pngs(images, Path(tmp))
        model = Path(tmp) / "model.pt"
        # In-process first, on a machine without the servers running.
        pngs = [f.read_bytes() for f in files]
        forward_rate, path_rate = in_process_rates(
            load_model(args.archive, Path(tmp)), images, pngs, min(args.seconds, 10)
        )
        sizes = (1, 8, 32)
        saved, batched = zip(*batch_rates(model, images, sizes, min(args.seconds, 3)), strict=True)
        print(
            f"in-process, 1 thread, img/s at batch {' / '.join(map(str, sizes))}: the model as saved "
            f"{figures(saved)}; the worker's copy for batches {figures(batched)}"
        )
        print(
            f"in-process, batch 1, 1 thread: model {forward_rate:,.0f} img/s; "
            f"decode PNG + model + answer JSON {path_rate:,.0f} img/s ({1e6 / path_rate:.0f} us each)"
        )
        # TorchServe with a handler that does nothing: what the frontend and its batching cost alone.
        with start_torchserve(null_archive(Path(tmp)), args.logs / "null-handler", Ports.free()) as server:
            floor = Contender("TorchServe, a no-op handler", server.url(), processes_of(server))
            warm_up(floor.url, files, max(args.connections), args.seconds)
            lone = floor.measure(files, 1, min(args.seconds, 10))
        print(
            f"TorchServe alone (a no-op handler, our batch settings), 1 connection: {lone.rate:,.0f} req/s, "
            f"p50 {lone.p50_ms:.2f} ms, CPU {lone.cpu_ms:.2f} ms/request: the floor under any handler"
        )
        baseline = archive_at(args.baseline, model, Path(tmp))
        print("side by side, same model, same decoding, same 100 real test digits as image/png bodies:")
        with (
            start_torchserve(args.archive, args.logs, Ports.free()) as server,
            start_torchserve(baseline, args.logs / "before-nginx", Ports.free(), front_on=False) as before_server,
            start_torchserve(args.archive, args.logs / "without-nginx", Ports.free(), front_on=False) as bare,
            kserve_peer(model, args.peer_workers, args.logs / "kserve.log") as peer,
        ):
            ours = Contender("ours (nginx + TorchServe 0.12)", server.url(), processes_of(server))
            before = Contender(f"before nginx ({args.baseline})", before_server.url(), processes_of(before_server))
            alone = Contender("TorchServe alone, no nginx", bare.url(), processes_of(bare))
            with MemoryPeaks(server) as memory:
                measure_side_by_side([ours, before, alone, peer], files, args.connections, args.seconds, args.rounds)
    print(f"after:  {load_line()}")
    print_table([ours, before, alone, peer], args.connections)
    print_targets(ours, peer, forward_rate, args.connections)
    for connections in args.connections:
        kept = ours.mean(connections, "rate") / before.mean(connections, "rate")
        # Each round measures both seconds apart, so the spread of their ratio shows how much one round can be off.
        per_round = [a.rate / b.rate for a, b in zip(ours.levels[connections], before.levels[connections], strict=True)]
        nginx_share = ours.mean(connections, "rate") / alone.mean(connections, "rate")
        print(
            f"{connections} connections: {kept:.1%} of the req/s before nginx ({args.baseline}) "
            f"(target >= {TARGET_KEPT:.0%}: {verdict(kept >= TARGET_KEPT)}; rounds {min(per_round):.0%} to "
            f"{max(per_round):.0%}); {nginx_share:.1%} of today's handler without nginx"
        )
    print()
    print(f"our peak resident memory under load (JVM heap {jvm_heap()}):")
    for name, peak in sorted(memory.peaks.items()):
        print(f"  {name:<16} {peak / 2**20:>6,.0f} MiB")
    print(
        f"  {'sum':<16} {sum(memory.peaks.values()) / 2**20:>6,.0f} MiB "
        "(RSS counts the workers' shared torch libraries twice)"
    )
    print(
        f"  {'PSS, all':<16} {memory.peak_pss / 2**20:>6,.0f} MiB "
        "(shared pages counted once: what the pod's memory limit must cover)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
