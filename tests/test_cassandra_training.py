"""Training from the Cassandra tables with checkpoints in the database, and resuming from one."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

from training import cli
from training.model import Net

pytestmark = [pytest.mark.cassandra, pytest.mark.slow]

# Small and quick, but a real run: data from the tables, two epochs, export, metrics.
TRAIN = [
    "train",
    "--source",
    "cassandra",
    "--checkpoints",
    "cassandra",
    "--epochs",
    "2",
    "--train-limit",
    "512",
    "--val-size",
    "256",
    "--seed",
    "3",
]


@pytest.fixture
def test_keyspace(monkeypatch, cassandra_settings):
    """In-process CLI runs read the settings from os.environ: point them at the test keyspace."""
    monkeypatch.setenv("CASSANDRA_KEYSPACE", cassandra_settings.keyspace)
    for name in ("ASTRA_DB_SECURE_BUNDLE", "ASTRA_DB_TOKEN", "ASTRA_DB_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


def test_checkpoints_go_to_the_database_and_a_run_resumes_from_one(
    full_load, cassandra, mnist, test_keyspace, tmp_path, capsys
):
    assert full_load.returncode == 0, full_load.stderr
    assert cli.main([*TRAIN, "--out", str(tmp_path / "whole")]) == 0
    run_id = re.search(r"as run (\S+) ", capsys.readouterr().err).group(1)

    rows = list(
        cassandra.execute(
            "SELECT epoch, comments, upload_date, network, optimizer FROM checkpoints WHERE run_id = %s", (run_id,)
        )
    )
    assert [row[0] for row in rows] == [2, 1]  # newest first
    assert rows[1][1].startswith("epoch 1/2: train loss ") and rows[1][2] is not None
    # The notebook's columns: network and optimizer state, loadable as they are.
    Net().load_state_dict(torch.load(io.BytesIO(rows[0][3]), weights_only=True))
    assert "state" in torch.load(io.BytesIO(rows[0][4]), weights_only=True)

    assert cli.main([*TRAIN, "--resume", f"cassandra:{run_id}@1", "--out", str(tmp_path / "resumed")]) == 0
    assert f"as run {run_id} " in capsys.readouterr().err  # a resumed run keeps its run id
    whole, resumed = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("whole", "resumed"))
    # Epoch 2 from the stored epoch-1 checkpoint is the same epoch 2 as in the run that went straight through.
    assert resumed["test_loss"] == whole["test_loss"]
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in whole["history"]]
    # Same data from the tables as from the files.
    assert whole["data_fingerprint"] == mnist.fingerprint()
    assert whole["data_origin"].startswith("cassandra ")


def test_resume_names_what_is_wrong(full_load, test_keyspace, capsys):
    assert cli.main([*TRAIN, "--resume", "cassandra:no-such-run"]) == 1
    assert (
        capsys.readouterr().err
        == "error: --resume cassandra:no-such-run: no checkpoints of a run no-such-run in the database\n"
    )
    assert cli.main([*TRAIN, "--resume", "cassandra:"]) == 1
    assert "expected cassandra:RUN_ID or cassandra:RUN_ID@EPOCH" in capsys.readouterr().err
