"""Benchmark the served model with wrk against the same TorchScript model in-process, and print the figures beside the targets."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from handler import inputs
from handler.client import encoded
from handler.mnist_handler import answer
from handler.server import CONFIG, Ports, Server, start_torchserve

WRK_SCRIPT = Path(__file__).with_name("wrk_post.lua")
LEVELS = (1, 16, 64)  # concurrent connections
DIGIT_COUNT = 100  # different test digits the requests rotate through
# The targets, on 2 cores with the load generator on the same cores.
TARGET_RPS = 3000  # at the highest level
TARGET_P99_MS = 50.0
TARGET_RATIO = 0.75  # served req/s over in-process batch-1 img/s
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

    def __enter__(self) -> "MemoryPeaks":
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
        serialized = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"]
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


def in_process_rates(model: torch.jit.ScriptModule, images: np.ndarray, pngs: list[bytes], seconds: float) -> tuple[float, float]:
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


def run_wrk(url: str, files: list[Path], connections: int, seconds: float) -> Level:
    command = [
        "wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s",
        "-s", str(WRK_SCRIPT), url, "--", *map(str, files),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])  # the line wrk_post.lua's done() prints
    errors = sum(figures[key] for key in ("connect", "read", "write", "status", "timeout"))
    return Level(connections, figures["requests"], figures["seconds"], figures["p50_ms"], figures["p99_ms"], errors)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handler.bench", description=__doc__)
    parser.add_argument("--archive", type=Path, default=Path("artifacts/model-store/mnist.mar"), help="model archive (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each load level (default: %(default)s)")
    parser.add_argument("--connections", type=lambda text: [int(n) for n in text.split(",")], default=list(LEVELS), help="load levels (default: 1,16,64)")
    parser.add_argument("--logs", type=Path, default=Path("artifacts/logs/bench"), help="TorchServe's logs (default: %(default)s)")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("error: wrk is not installed; scripts/with-wrk.sh installs it (apt-get install wrk)", file=sys.stderr)
        return 1

    print(f"before: {load_line()}")
    images, _ = digit_images(DIGIT_COUNT)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        files = write_pngs(images, Path(tmp))
        # In-process first, on a machine without the server running.
        forward_rate, path_rate = in_process_rates(load_model(args.archive, Path(tmp)), images, [f.read_bytes() for f in files], min(args.seconds, 10))
        print(f"in-process, batch 1, 1 thread: model {forward_rate:,.0f} img/s; "
              f"decode PNG + model + answer JSON {path_rate:,.0f} img/s ({1e6 / path_rate:.0f} us each)")
        levels = []
        with start_torchserve(args.archive, args.logs, Ports.free()) as server:
            run_wrk(server.url(), files, max(args.connections), 3)  # JIT warm-up of the JVM and the workers
            with MemoryPeaks(server) as memory:
                for connections in args.connections:
                    levels.append(run_wrk(server.url(), files, connections, args.seconds))
    print(f"after:  {load_line()}")
    print()
    print(f"{'connections':>11}  {'req/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  {'errors':>6}  {'served/in-process':>17}")
    for level in levels:
        print(f"{level.connections:>11}  {level.rate:>8,.0f}  {level.p50_ms:>7.1f}  {level.p99_ms:>7.1f}  {level.errors:>6}  {level.rate / forward_rate:>17.2f}")
    top = max(levels, key=lambda level: level.connections)
    errors = sum(level.errors for level in levels)
    print()
    print(f"targets (set for 2 cores with the load generator on them; here {os.cpu_count()} cores), at {top.connections} connections:")
    for target, figure, met in (
        (f">= {TARGET_RPS:,} req/s", f"{top.rate:,.0f} req/s", top.rate >= TARGET_RPS),
        (f"p99 <= {TARGET_P99_MS:g} ms", f"{top.p99_ms:.1f} ms", top.p99_ms <= TARGET_P99_MS),
        (f"served >= {TARGET_RATIO} x in-process batch 1", f"{top.rate / forward_rate:.2f} x ({top.rate:,.0f} / {forward_rate:,.0f})", top.rate >= TARGET_RATIO * forward_rate),
        ("0 errors, every level", f"{errors} errors", errors == 0),
    ):
        print(f"  {target:<36} {figure:<28} {verdict(met)}")
    print(f"reference: {STOCK_EXAMPLE}")
    print()
    print(f"peak resident memory under load (JVM heap {jvm_heap()}):")
    for name, peak in sorted(memory.peaks.items()):
        print(f"  {name:<16} {peak / 2**20:>6,.0f} MiB")
    print(f"  {'sum':<16} {sum(memory.peaks.values()) / 2**20:>6,.0f} MiB (RSS counts the workers' shared torch libraries twice)")
    print(f"  {'PSS, all':<16} {memory.peak_pss / 2**20:>6,.0f} MiB (shared pages counted once: what the pod's memory limit must cover)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
