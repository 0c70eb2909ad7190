"""MNIST read out of Cassandra tables, in either table layout, as the same arrays the IDX files give."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from cassandra.cluster import Session
from cassandra.query import BatchStatement, BatchType, PreparedStatement
from tqdm import tqdm

from registry import db
from training.data import TEST_COUNT, TRAIN_COUNT, DataError, Mnist

PIXELS = 28 * 28
BUCKET_SIZE = 100  # images per partition in the blob layout: 100 x 784 B = 78 KB partitions


@dataclass(frozen=True)
class Layout:
    """How images sit in tables; see schema.cql. Subclasses differ in pixel encoding and partitioning."""

    name: str
    tables: dict[str, str]  # split -> table
    partition_key: str
    write_window: int  # requests in flight while loading
    page_rows: int  # rows per page when reading

    def table(self, split: str) -> str:
        return self.tables[split]

    def prepare_insert(self, session: Session, split: str) -> PreparedStatement:
        raise NotImplementedError

    def statements(
        self, insert: PreparedStatement, ids: np.ndarray, labels: np.ndarray, images: np.ndarray
    ) -> Iterator[tuple]:
        """(statement, parameters, rows) triples that write these images."""
        raise NotImplementedError

    def pixel_bytes(self, pixels: list) -> bytes:
        """The pixels column of many rows as one buffer of 784 bytes per row; DataError if malformed."""
        malformed = next((p for p in pixels if p is None or len(p) != PIXELS), False)
        if malformed is not False:
            raise DataError(f"a row's pixels hold {len(malformed or ())} values, expected {PIXELS} (28 x 28)")
        return self.join(pixels)

    def join(self, pixels: list) -> bytes:
        raise NotImplementedError


class BlobLayout(Layout):
    def prepare_insert(self, session, split):
        return session.prepare(f"INSERT INTO {self.table(split)} (bucket, id, label, pixels) VALUES (?, ?, ?, ?)")

    def statements(self, insert, ids, labels, images):
        # One unlogged batch per bucket: a single-partition batch is one mutation on the server,
        # which is what makes loading fast (Cassandra applies no batch size limit to those).
        buckets = ids // BUCKET_SIZE
        starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(ids)], strict=True):
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            for i in range(start, end):
                batch.add(insert, (int(buckets[i]), int(ids[i]), int(labels[i]), images[i].tobytes()))
            yield batch, (), end - start

    def join(self, pixels):
        return b"".join(pixels)


class NotebookLayout(Layout):
    def prepare_insert(self, session, split):
        return session.prepare(f"INSERT INTO {self.table(split)} (id, label, pixels) VALUES (?, ?, ?)")

    def statements(self, insert, ids, labels, images):
        for i in range(len(ids)):
            yield insert, (int(ids[i]), int(labels[i]), images[i].ravel().tolist()), 1

    def join(self, pixels):
        values = np.array(pixels, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise DataError("pixel values outside 0..255; these are not MNIST pixels")
        return values.astype(np.uint8).tobytes()


LAYOUTS: dict[str, Layout] = {
    # A blob row is ~0.8 kB: 5,000 rows make a 4 MB page.
    "blob": BlobLayout(
        "blob", {"train": "train_images", "test": "test_images", "predict": "predict_images"}, "bucket", 16, 5000
    ),
    # A notebook row is 784 list cells, ~140 kB on the node's heap while it builds a page: pages of
    # 5,000 such rows ran a 512 MiB node out of memory; 200 keep a page near 30 MB.
    "notebook": NotebookLayout(
        "notebook", {"train": "raw_train", "test": "raw_test", "predict": "raw_predict"}, "id", 16, 200
    ),
}


@dataclass
class Images:
    """One table's rows ordered by id: ids, labels (-1 where null) and N x 28 x 28 uint8 pixels."""

    table: str
    ids: np.ndarray
    labels: np.ndarray
    images: np.ndarray


def read_images(
    session: Session,
    layout: Layout,
    split: str,
    ranges: int | None = None,
    progress: tqdm | None = None,
    span: tuple[int, int] = (db.MIN_TOKEN, db.MAX_TOKEN),
) -> Images:
    """Every image of a split's table (or of its partitions whose tokens lie in `span`), read in parallel token
    ranges, ordered by id."""
    table = layout.table(split)
    rows = db.read_token_ranges(
        session,
        table,
        layout.partition_key,
        ("id", "label", "pixels"),
        layout.page_rows,
        ranges,
        on_rows=progress.update if progress is not None else lambda count: None,
        span=span,
    )
    if not rows:
        return Images(table, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 28, 28), np.uint8))
    ids, labels, pixels = zip(*rows, strict=True)
    order = np.argsort(np.array(ids, dtype=np.int64), kind="stable")
    ids = np.array(ids, dtype=np.int64)[order]
    labels = np.array([-1 if label is None else label for label in labels], dtype=np.int64)[order]
    try:
        buffer = layout.pixel_bytes([pixels[i] for i in order])
    except DataError as error:
        raise DataError(f"{table}: {error}") from None
    return Images(table, ids, labels, np.frombuffer(buffer, dtype=np.uint8).reshape(-1, 28, 28))


def check_ids(images: Images, how_to_load: str) -> None:
    """The ids must be 0..N-1: a gap is a row lost or a load that stopped halfway."""
    expected = np.arange(len(images.ids))
    if not np.array_equal(images.ids, expected):
        first = int(expected[np.argmax(images.ids != expected)])
        raise DataError(
            f"{images.table}: the {len(images.ids):,} rows do not have the ids 0..{len(images.ids) - 1:,} "
            f"(id {first:,} is missing or repeated); load the table again with: {how_to_load}"
        )


@dataclass
class CassandraMnist:
    """MnistSource over the train and test tables of a layout. Read once per run: training keeps
    the arrays in memory for every epoch, and the full read takes seconds, so there is no disk
    cache that could go stale when the tables change."""

    session: Session
    layout: Layout
    where: str  # for Mnist.origin, e.g. "127.0.0.1:9042, keyspace mnist"
    expect_mnist_counts: bool = True  # False: take whatever row counts the tables hold
    ranges: int | None = None

    @property
    def how_to_load(self) -> str:
        return "python -m training load-data" + (" --layout notebook" if self.layout.name == "notebook" else "")

    @property
    def origin(self) -> str:
        tables = f"{self.layout.table('train')}, {self.layout.table('test')}"
        return f"cassandra {self.where}, {self.layout.name} layout ({tables})"

    def progress(self) -> tqdm:
        return tqdm(desc=f"reading {self.layout.name} tables", unit=" rows", file=sys.stderr, disable=None, leave=False)

    def check(self, table: str, rows: int, unlabelled: int, expected: int) -> None:
        """What a table read in whole or in shares must satisfy, from its row counts (ids are checked apart)."""
        if not rows:
            raise DataError(f"{table} in {self.where} is empty; load MNIST with: {self.how_to_load}")
        if unlabelled:
            raise DataError(
                f"{table}: {unlabelled:,} of {rows:,} rows have no label (the notebook put "
                f"Kaggle's unlabelled test.csv there); training needs labelled images: {self.how_to_load}"
            )
        if self.expect_mnist_counts and rows != expected:
            raise DataError(
                f"{table} holds {rows:,} images, MNIST has {expected:,}; load MNIST with "
                f"`{self.how_to_load}`, or pass --any-count to train on the rows that are there"
            )

    def read_checked(self, split: str, bar: tqdm) -> Images:
        """A split's whole table, its ids and labels checked."""
        images = read_images(self.session, self.layout, split, self.ranges, bar)
        if len(images.ids):
            check_ids(images, self.how_to_load)
        expected = TRAIN_COUNT if split == "train" else TEST_COUNT
        self.check(images.table, len(images.ids), int((images.labels < 0).sum()), expected)
        return images

    def load(self) -> Mnist:
        arrays = {}
        with self.progress() as bar:
            for split in ("train", "test"):
                images = self.read_checked(split, bar)
                arrays[f"{split}_images"], arrays[f"{split}_labels"] = images.images, images.labels.astype(np.uint8)
        mnist = Mnist(**arrays, origin=self.origin)
        return mnist.check_counts(train=len(mnist.train_images), test=len(mnist.test_images))
