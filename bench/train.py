"""make bench-train: training speed as one rank using every core beside two ranks with a core each (torchrun,
gloo), in one run: images/s, epoch time, and the all-reduce's share of a step. With --device cuda the same runs
as one rank and one rank per GPU (NCCL).

Each layout runs the training loop of `mnist-train train` (training/train.py's train_epoch, DDP when there are
several ranks) on a subset: one warm-up epoch, then epochs with the gradients all-reduced alternating with
epochs without (DDP's no_sync), best of each. The all-reduce's share of a step is 1 - (without / with): what
the averaging of gradients, and the ranks' waiting for each other at it, add to a step. Validation, the export
and the writing of outputs are not timed."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from training import distributed
from training.data import DownloadedMnist, share_of
from training.train import TrainConfig, new_state, pick_device, seed_everything, split, train_epoch

ROOT = Path(__file__).resolve().parent.parent
# Issue 24 sets no figure for speed: it asks for these layouts side by side, with the all-reduce's share.
TARGETS = (
    "issue 24 sets no speed target: it asks for 1 rank x 2 threads beside 2 ranks x 1 thread, with the "
    "all-reduce's share of a step; its accuracy target (>= 99.3 % for a full-data 2-rank run) is not measured here"
)


@dataclass
class Figures:
    ranks: int
    threads: int
    device: str
    images: int  # per epoch, over all ranks
    epoch_seconds: float  # best epoch with the gradients all-reduced
    unsynced_seconds: float  # best epoch without (the same as epoch_seconds for one rank)

    @property
    def images_per_second(self) -> float:
        return self.images / self.epoch_seconds

    @property
    def all_reduce_share(self) -> float | None:
        if self.ranks == 1:
            return None
        return max(0.0, 1 - self.unsynced_seconds / self.epoch_seconds)


# --- the worker: one rank, under torchrun ----------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    requested = pick_device(args.device)
    with distributed.process_group(requested):
        device = distributed.rank_device(requested)
        rank, world = distributed.rank(), distributed.size()
        config = TrainConfig(
            epochs=1 + 2 * args.repeats,
            batch_size=args.batch_size,
            val_size=0,
            train_limit=args.images,
            device=str(device),
        )
        seed_everything(config.seed)
        mnist = DownloadedMnist().load()
        mine = share_of(mnist, distributed.shard(len(mnist.train_images), rank, world), with_test=False)
        (images, labels), _ = split(mine, config)
        total = sum(distributed.all_gather(len(images)))
        state = new_state(config, device, steps_per_epoch=math.ceil(total / config.batch_size))
        model = distributed.wrap(state.model, device)
        generator = torch.Generator()

        def epoch(synced: bool) -> float:
            generator.manual_seed(config.seed * 1000 + rank)
            unsynced = world > 1 and not synced
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            with model.no_sync() if unsynced else nullcontext():
                train_epoch(
                    model, device, images, labels, state.optimizer, state.scheduler, config, generator, "", total
                )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return max(distributed.all_gather(time.perf_counter() - started))  # the slowest rank sets the pace

        epoch(True)  # warm-up: allocations, the first all-reduce's connections
        synced, unsynced = [], []
        for _ in range(args.repeats):
            synced.append(epoch(True))
            unsynced.append(epoch(False) if world > 1 else synced[-1])
        if distributed.is_main():
            figures = Figures(world, args.threads, str(device), total, min(synced), min(unsynced))
            args.report.write_text(json.dumps(figures.__dict__))


# --- the parent: each layout under torchrun, then the table ----------------------------------------------


def layouts(device: torch.device) -> tuple[list[tuple[int, int]], str | None]:
    """(ranks, threads per rank) to compare, and a note when a layout cannot run here."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < 2:
            return [(1, cores)], "one GPU here: one rank per GPU is the 1-rank run; 2 ranks need 2 GPUs (NCCL)"
        return [(1, cores), (gpus, max(1, cores // gpus))], None
    return [(1, cores), (2, max(1, cores // 2))], None


def run_layout(ranks: int, threads: int, args: argparse.Namespace, report: Path) -> Figures:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # torchrun
        "--standalone",
        "--nproc-per-node",
        str(ranks),
        "-m",
        "bench.train",
        "--worker",
        "--report",
        str(report),
        "--threads",
        str(threads),
        "--device",
        args.device,
        "--images",
        str(args.images),
        "--batch-size",
        str(args.batch_size),
        "--repeats",
        str(args.repeats),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{ranks} rank(s) x {threads} thread(s) failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return Figures(**json.loads(report.read_text()))


def table(figures: list[Figures], batch_size: int) -> str:
    lines = [
        f"{'ranks x threads':<16} {'device':<8} {'images/s':>9} {'epoch s':>8} {'step ms':>8}  "
        "all-reduce share of a step"
    ]
    for f in figures:
        step_ms = 1000 * f.epoch_seconds / math.ceil(f.images / batch_size)
        share = f.all_reduce_share
        shown = "-" if share is None else f"{share:.0%} ({share * step_ms:.1f} ms)"
        lines.append(
            f"{f'{f.ranks} x {f.threads}':<16} {f.device:<8} {f.images_per_second:>9,.0f} {f.epoch_seconds:>8.2f} "
            f"{step_ms:>8.1f}  {shown}"
        )
    if len(figures) == 2:
        one, many = figures
        lines.append(
            f"{many.ranks} x {many.threads} against 1 x {one.threads}: "
            f"{many.images_per_second / one.images_per_second:.2f}x the images/s"
        )
    return "\n".join(lines)


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__)
    parser.add_argument(
        "--device", default="cpu", help="cpu (gloo between ranks) or cuda (NCCL, one rank per GPU) (default: cpu)"
    )
    parser.add_argument(
        "--images", type=int, default=20_000, help="training images per epoch, over all ranks (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="images per step over all ranks (default: 128)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed epochs with and without the all-reduce, best of (default: 2)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of each layout, taking turns; the best is shown (default: 2)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    try:
        device = pick_device(args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    plans, note = layouts(device)
    print(
        f"bench-train: {args.images:,} MNIST training images per epoch, batch {args.batch_size}, augmented, on "
        f"{device.type}; best of {args.repeats} epochs after a warm-up, best of {args.rounds} rounds ({load_line()})",
        flush=True,
    )
    best: dict[tuple[int, int], Figures] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        # The layouts take turns, and each keeps its best round: on a shared machine the load drifts, and
        # one layout should not get all the quiet minutes.
        for round_number in range(1, args.rounds + 1):
            for ranks, threads in plans:
                started = time.perf_counter()
                try:
                    figures = run_layout(ranks, threads, args, Path(tmp) / f"{ranks}.json")
                except RuntimeError as error:
                    print(f"error: {error}", file=sys.stderr)
                    return 1
                if (ranks, threads) not in best or figures.epoch_seconds < best[ranks, threads].epoch_seconds:
                    best[ranks, threads] = figures
                print(
                    f"  round {round_number}, {ranks} x {threads}: {figures.images_per_second:,.0f} images/s "
                    f"({time.perf_counter() - started:.0f} s with start-up; {load_line()})",
                    flush=True,
                )
    print(table([best[plan] for plan in plans], args.batch_size))
    if note:
        print(f"note: {note}")
    print(f"targets: {TARGETS}")
    between = "NCCL" if device.type == "cuda" else "gloo"
    print(f"after: {load_line()}; torch {torch.__version__}, {between} between the ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
