"""predict-table: a registered model scores the predict table and its answers land in the predictions table."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import NOTEBOOK_ROWS, run_cli

from registry.store import Registry, read_metrics
from training import export
from training.cassandra_source import LAYOUTS
from training.load_data import load

pytestmark = pytest.mark.cassandra


def predictions(session, table: str, version: str) -> dict[int, tuple]:
    rows = session.execute("SELECT source_table, id, model_version, digit, confidence, label FROM predictions")
    return {row[1]: row[3:] for row in rows if row[0] == table and row[2] == version}


def expected_answers(model_archive, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the archived model says, computed here without the database."""
    model = export.load(model_archive.parent / "model.pt")
    with torch.inference_mode():
        probabilities = torch.softmax(model(torch.from_numpy(images.copy()).unsqueeze(1)), dim=1)
    confidence, digit = probabilities.max(dim=1)
    return digit.numpy(), confidence.numpy()


def test_predict_table_writes_digit_confidence_and_version_for_every_row(
    full_load, cassandra, cassandra_env, model_archive, metrics_file, mnist
):
    assert full_load.returncode == 0, full_load.stderr
    registry = Registry(cassandra)
    registry.publish(model_archive, read_metrics(metrics_file), "predict-1")
    registry.promote("predict-1", "predict-test")

    result = run_cli(cassandra_env, "training", "predict-table", "--version", "predict-test")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("scored 1,000 rows of predict_images with model version predict-1; accuracy ")

    written = predictions(cassandra, "predict_images", "predict-1")
    assert sorted(written) == list(range(1000))
    digits, confidences = expected_answers(model_archive, mnist.test_images[:1000])
    assert [written[i][0] for i in range(1000)] == digits.tolist()
    assert np.allclose([written[i][1] for i in range(1000)], confidences, atol=1e-6)
    assert [written[i][2] for i in range(1000)] == mnist.test_labels[:1000].tolist()


def test_predict_table_reads_the_notebooks_raw_predict(cassandra, cassandra_env, model_archive, metrics_file, mnist):
    load(cassandra, LAYOUTS["notebook"], mnist, limit=NOTEBOOK_ROWS, predict=100)
    Registry(cassandra).publish(model_archive, read_metrics(metrics_file), "predict-2")
    result = run_cli(cassandra_env, "training", "predict-table", "--layout", "notebook", "--version", "predict-2")
    assert result.returncode == 0, result.stderr
    written = predictions(cassandra, "raw_predict", "predict-2")
    digits, _ = expected_answers(model_archive, mnist.test_images[:100])
    assert [written[i][0] for i in range(100)] == digits.tolist()


def test_an_archive_without_its_model_writes_nothing(cassandra, cassandra_env, metrics_file, tmp_path):
    hollow = tmp_path / "hollow.mar"
    with zipfile.ZipFile(hollow, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"serializedFile": "model.pt"}}))
    Registry(cassandra).publish(hollow, read_metrics(metrics_file), "hollow-1")
    result = run_cli(cassandra_env, "training", "predict-table", "--version", "hollow-1")
    assert result.returncode == 1
    assert (
        result.stderr == "error: version hollow-1: the archive's manifest names model.pt, which is not in the archive\n"
    )
    assert predictions(cassandra, "predict_images", "hollow-1") == {}
