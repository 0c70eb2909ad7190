"""Load MNIST into the database tables of a layout, concurrently, and check every row arrived."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
from cassandra.cluster import Session
from tqdm import tqdm

from registry import db
from training.cassandra_source import Layout
from training.data import DataError, Mnist


@dataclass
class TableLoad:
    table: str
    rows: int  # written by this load (ids 0..rows-1)
    others: int  # rows found with other ids, left by an earlier, bigger load


@dataclass
class LoadReport:
    tables: list[TableLoad]
    seconds: float  # writing only, without the check

    @property
    def rows(self) -> int:
        return sum(table.rows for table in self.tables)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def what_to_load(mnist: Mnist, limit: int | None, predict: int) -> dict[str, tuple]:
    """split -> (labels, images): the first `limit` of each split, and the first `predict` test
    images (labels kept, so predict-table can report accuracy) as the rows to predict."""
    chosen = {
        "train": (mnist.train_labels[:limit], mnist.train_images[:limit]),
        "test": (mnist.test_labels[:limit], mnist.test_images[:limit]),
    }
    if predict:
        chosen["predict"] = (mnist.test_labels[:predict], mnist.test_images[:predict])
    return chosen


def load(session: Session, layout: Layout, mnist: Mnist, limit: int | None = None, predict: int = 0) -> LoadReport:
    """Write the images (upserts by id: running it again changes nothing), then check the counts."""
    chosen = what_to_load(mnist, limit, predict)
    inserts = {split: layout.prepare_insert(session, split) for split in chosen}

    def statements():
        for split, (labels, images) in chosen.items():
            yield from layout.statements(inserts[split], np.arange(len(images)), labels, images)

    total = sum(len(images) for _, images in chosen.values())
    started = time.perf_counter()
    with tqdm(
        total=total, desc=f"loading {layout.name} layout", unit=" rows", file=sys.stderr, disable=None, leave=False
    ) as bar:
        db.execute_windowed(session, statements(), layout.write_window, on_done=bar.update)
    seconds = time.perf_counter() - started
    tables = [check_loaded(session, layout, split, len(images)) for split, (_, images) in chosen.items()]
    return LoadReport(tables, seconds)


def check_loaded(session: Session, layout: Layout, split: str, rows: int) -> TableLoad:
    """Read back the ids of a split's table: every id 0..rows-1 must be there."""
    table = layout.table(split)
    ids = np.array(
        [row[0] for row in db.read_token_ranges(session, table, layout.partition_key, ("id",), layout.page_rows)],
        dtype=np.int64,
    )
    present = np.zeros(rows, dtype=bool)
    present[ids[(ids >= 0) & (ids < rows)]] = True
    missing = rows - int(present.sum())
    if missing:
        raise DataError(
            f"{table}: {missing:,} of the {rows:,} rows written are not in the table (first missing: id "
            f"{int(np.argmin(present)):,}); run load-data again"
        )
    return TableLoad(table, rows, others=len(ids) - rows)
