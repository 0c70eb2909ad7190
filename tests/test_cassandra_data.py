"""MNIST into the local Cassandra node and back: load-data, its count check, the Cassandra data source."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from conftest import NOTEBOOK_ROWS, run_cli

from training.cassandra_source import LAYOUTS, CassandraMnist, read_images
from training.data import DataError
from training.load_data import check_loaded, load

pytestmark = pytest.mark.cassandra

BLOB, NOTEBOOK = LAYOUTS["blob"], LAYOUTS["notebook"]


def count(session, table: str) -> int:
    """An independent count, not the loader's own check."""
    return session.execute(f"SELECT COUNT(*) FROM {table}").one()[0]


@pytest.fixture(scope="module")
def notebook_load(cassandra_env):
    return run_cli(
        cassandra_env,
        "training",
        "load-data",
        "--layout",
        "notebook",
        "--limit",
        str(NOTEBOOK_ROWS),
        "--predict",
        "100",
    )


def test_load_data_writes_all_70000_images_and_checks_the_count(full_load, cassandra):
    assert full_load.returncode == 0, full_load.stderr
    assert "count check passed" in full_load.stdout
    rate = float(re.search(r"([\d,]+) rows/s", full_load.stdout).group(1).replace(",", ""))
    print(f"\nload-data, blob layout: {full_load.stdout.strip()}")
    assert (count(cassandra, "train_images"), count(cassandra, "test_images"), count(cassandra, "predict_images")) == (
        60_000,
        10_000,
        1_000,
    )
    assert rate > 0


def test_the_count_check_finds_a_row_that_is_not_there(cassandra, mnist):
    load(cassandra, NOTEBOOK, mnist, limit=NOTEBOOK_ROWS, predict=100)
    cassandra.execute("DELETE FROM raw_predict WHERE id = 42")
    try:
        with pytest.raises(
            DataError, match=r"raw_predict: 1 of the 100 rows written are not in the table \(first missing: id 42\)"
        ):
            check_loaded(cassandra, NOTEBOOK, "predict", 100)
    finally:
        load(cassandra, NOTEBOOK, mnist, limit=NOTEBOOK_ROWS, predict=100)
    assert check_loaded(cassandra, NOTEBOOK, "predict", 100).rows == 100


def test_load_data_again_changes_nothing(notebook_load, cassandra_env, cassandra, mnist):
    assert notebook_load.returncode == 0, notebook_load.stderr
    before = CassandraMnist(cassandra, NOTEBOOK, "test", expect_mnist_counts=False).load()
    again = run_cli(
        cassandra_env,
        "training",
        "load-data",
        "--layout",
        "notebook",
        "--limit",
        str(NOTEBOOK_ROWS),
        "--predict",
        "100",
    )
    assert again.returncode == 0, again.stderr
    after = CassandraMnist(cassandra, NOTEBOOK, "test", expect_mnist_counts=False).load()
    assert (count(cassandra, "raw_train"), count(cassandra, "raw_test"), count(cassandra, "raw_predict")) == (
        NOTEBOOK_ROWS,
        NOTEBOOK_ROWS,
        100,
    )
    assert after.fingerprint() == before.fingerprint()
    assert np.array_equal(after.train_images, mnist.train_images[:NOTEBOOK_ROWS])


def test_the_cassandra_source_gives_the_same_arrays_as_the_files(full_load, cassandra, mnist):
    assert full_load.returncode == 0, full_load.stderr
    started = time.perf_counter()
    from_db = CassandraMnist(cassandra, BLOB, "test keyspace").load()
    seconds = time.perf_counter() - started
    print(f"\nread 70,000 rows (blob layout) in {seconds:.2f} s")
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(from_db, name), getattr(mnist, name)), name
        assert getattr(from_db, name).dtype == np.uint8
    assert from_db.fingerprint() == mnist.fingerprint()
    assert "blob layout" in from_db.origin  # its speed against the target: make bench-db


def test_the_notebook_layout_reads_into_the_same_arrays(notebook_load, cassandra, mnist):
    assert notebook_load.returncode == 0, notebook_load.stderr
    from_db = CassandraMnist(cassandra, NOTEBOOK, "test keyspace", expect_mnist_counts=False).load()
    assert np.array_equal(from_db.train_images, mnist.train_images[:NOTEBOOK_ROWS])
    assert np.array_equal(from_db.train_labels, mnist.train_labels[:NOTEBOOK_ROWS])
    assert np.array_equal(from_db.test_images, mnist.test_images[:NOTEBOOK_ROWS])


def test_tables_that_are_not_all_of_mnist_are_refused_unless_asked(notebook_load, cassandra):
    with pytest.raises(DataError, match=f"raw_train holds {NOTEBOOK_ROWS:,} images, MNIST has 60,000.*--any-count"):
        CassandraMnist(cassandra, NOTEBOOK, "test keyspace").load()


def test_unlabelled_rows_are_refused_for_training(notebook_load, cassandra):
    # The notebook filled raw_test from Kaggle's test.csv, which has no labels.
    cassandra.execute("INSERT INTO raw_test (id, pixels) VALUES (%s, %s)", (NOTEBOOK_ROWS, [0] * 784))
    try:
        with pytest.raises(DataError, match=f"raw_test: 1 of {NOTEBOOK_ROWS + 1:,} rows have no label"):
            CassandraMnist(cassandra, NOTEBOOK, "test keyspace", expect_mnist_counts=False).load()
    finally:
        cassandra.execute("DELETE FROM raw_test WHERE id = %s", (NOTEBOOK_ROWS,))


def test_a_gap_in_the_ids_is_reported(notebook_load, cassandra, mnist):
    cassandra.execute("DELETE FROM raw_train WHERE id = 7")
    try:
        with pytest.raises(
            DataError,
            match=r"raw_train: .* \(id 7 is missing or repeated\); load the table again with: python -m training "
            r"load-data --layout notebook",
        ):
            CassandraMnist(cassandra, NOTEBOOK, "test keyspace", expect_mnist_counts=False).load()
    finally:
        load(cassandra, NOTEBOOK, mnist, limit=NOTEBOOK_ROWS)


def test_bench_db_prints_both_layouts_beside_the_targets(cassandra_env, cassandra_settings):
    result = run_cli(cassandra_env, "training", "bench-db", "--keyspace", cassandra_settings.keyspace, "--limit", "200")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("blob ") and ">= 10,000" in line and "<= 10" in line for line in lines), result.stdout
    assert any(line.startswith("notebook ") for line in lines), result.stdout


def test_a_malformed_pixels_blob_is_named(full_load, cassandra):
    cassandra.execute("INSERT INTO predict_images (bucket, id, label, pixels) VALUES (50, 5000, 1, %s)", (bytes(783),))
    try:
        with pytest.raises(DataError, match=r"predict_images: a row's pixels hold 783 values, expected 784"):
            read_images(cassandra, BLOB, "predict")
    finally:
        cassandra.execute("DELETE FROM predict_images WHERE bucket = 50 AND id = 5000")
