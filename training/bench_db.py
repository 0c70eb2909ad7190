"""Load and read speed of both table layouts side by side, against the targets."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from cassandra.cluster import Session

from training.cassandra_source import LAYOUTS, CassandraMnist
from training.data import Mnist
from training.load_data import load

LOAD_TARGET = 10_000  # rows/s into the local node
READ_TARGET = 10.0  # seconds for the full MNIST read a training run does


@dataclass
class Figures:
    layout: str
    rows_loaded: int
    rows_per_second: float
    rows_read: int
    read_seconds: float


def measure(session: Session, mnist: Mnist, where: str, limit: int | None = None) -> list[Figures]:
    figures = []
    for layout in LAYOUTS.values():
        report = load(session, layout, mnist, limit)
        started = time.perf_counter()
        read = CassandraMnist(session, layout, where, expect_mnist_counts=limit is None).load()
        seconds = time.perf_counter() - started
        figures.append(
            Figures(
                layout.name,
                report.rows,
                report.rows_per_second,
                len(read.train_images) + len(read.test_images),
                seconds,
            )
        )
    return figures


def table(figures: list[Figures]) -> str:
    lines = [
        f"{'layout':<10} {'rows':>7} {'load rows/s':>12}  {'target':<10} {'read s':>7}  {'target':<8}",
    ]
    for f in figures:
        load_ok = "ok" if f.rows_per_second >= LOAD_TARGET else "MISSED"
        read_ok = "ok" if f.read_seconds <= READ_TARGET else "MISSED"
        lines.append(
            f"{f.layout:<10} {f.rows_loaded:>7,} {f.rows_per_second:>12,.0f}  >= {LOAD_TARGET:,} {load_ok:<3} "
            f"{f.read_seconds:>6.1f}  <= {READ_TARGET:.0f} {read_ok}"
        )
    load1, load5, _ = os.getloadavg()
    lines.append(
        f"(read = train and test tables into arrays, as training does; load average {load1:.1f} / {load5:.1f} on "
        f"{os.cpu_count()} cores)"
    )
    return "\n".join(lines)
