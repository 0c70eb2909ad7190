"""Score the rows of the predict table with a registered model version and write the predictions back."""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from cassandra.cluster import Session
from tqdm import tqdm

from registry import db
from registry.store import BadInput, Registry, serialized_file
from training import export
from training.cassandra_source import Layout, read_images
from training.data import DataError

WRITE_WINDOW = 64  # one row per image and partition: many small writes in flight


@dataclass
class PredictReport:
    table: str
    version: str
    rows: int
    labelled: int
    correct: int
    seconds: float

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


def load_model(archive: bytes, version: str) -> torch.jit.ScriptModule:
    """The TorchScript model inside a .mar (a zip: its manifest names the file)."""
    try:
        name, model_bytes = serialized_file(archive)
    except BadInput as error:
        raise BadInput(f"version {version}: {error}") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        path.write_bytes(model_bytes)
        try:
            return export.load(path)
        except RuntimeError as error:
            raise BadInput(
                f"version {version}: {name} in the archive is not a TorchScript model ({str(error).splitlines()[0]})"
            ) from None


@torch.inference_mode()
def predict(model: torch.jit.ScriptModule, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Digit and softmax confidence for N x 28 x 28 uint8 images (the model takes N x 1 x 28 x 28 uint8)."""
    digits, confidences = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size].copy()).unsqueeze(1)  # copy: read-only buffers
        logits = model(batch)
        if logits.ndim != 2 or logits.shape != (len(batch), 10):
            raise BadInput(
                f"the model answered shape {tuple(logits.shape)} for {len(batch)} images, expected {len(batch)} x 10 "
                f"logits"
            )
        confidence, digit = torch.softmax(logits.float(), dim=1).max(dim=1)
        digits.append(digit.numpy())
        confidences.append(confidence.numpy())
    return np.concatenate(digits), np.concatenate(confidences)


def predict_table(session: Session, layout: Layout, model_name: str, batch_size: int = 1000) -> PredictReport:
    """Read every row of the layout's predict table, score them all, then write the predictions."""
    started = time.perf_counter()
    version, archive = Registry(session).archive(model_name)
    model = load_model(archive, version.version)
    rows = read_images(session, layout, "predict")
    if not len(rows.ids):
        raise DataError(
            f"{rows.table} is empty; put images there first, e.g. python -m training load-data --predict 1000"
            + (" --layout notebook" if layout.name == "notebook" else "")
        )
    # Scoring finishes before the first write, so a model that fails leaves the table untouched.
    digits, confidences = predict(model, rows.images, batch_size)
    insert = session.prepare(
        "INSERT INTO predictions (source_table, id, model_version, digit, confidence, label, predicted_at) VALUES "
        "(?, ?, ?, ?, ?, ?, ?)"
    )
    now = datetime.now(UTC)
    statements = (
        (insert, (rows.table, int(i), version.version, int(d), float(c), None if label < 0 else int(label), now), 1)
        for i, d, c, label in zip(rows.ids, digits, confidences, rows.labels, strict=True)
    )
    with tqdm(
        total=len(rows.ids), desc="writing predictions", unit=" rows", file=sys.stderr, disable=None, leave=False
    ) as bar:
        db.execute_windowed(session, statements, WRITE_WINDOW, on_done=bar.update)
    labelled = rows.labels >= 0
    return PredictReport(
        table=rows.table,
        version=version.version,
        rows=len(rows.ids),
        labelled=int(labelled.sum()),
        correct=int((digits[labelled] == rows.labels[labelled]).sum()),
        seconds=time.perf_counter() - started,
    )
