"""Training checkpoints in Cassandra, one row per epoch of a run, and reading one back to resume."""

from __future__ import annotations

import io
import secrets
from datetime import UTC, datetime

import torch
from cassandra.cluster import Session

from training.train import TrainConfig, TrainState

PREFIX = "cassandra:"
# Cassandra refuses a mutation over half a commit-log segment (16 MiB by default); our Net's
# checkpoint is about 130 kB, so this is a guard for much larger models, not a working limit.
MAX_ROW_BYTES = 15 << 20
SEPARATE = ("model_state_dict", "optimizer_state_dict")  # the notebook's network and optimizer columns


def new_run_id() -> str:
    """Sorts by start time, unique without coordination: 20251122T091502Z-3f9a."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def parse_reference(text: str) -> tuple[str, int | None]:
    """'cassandra:RUN_ID' (its last epoch) or 'cassandra:RUN_ID@EPOCH' -> (run id, epoch or None)."""
    reference = text.removeprefix(PREFIX)
    run_id, _, epoch = reference.partition("@")
    if not run_id or (epoch and not epoch.isdigit()):
        raise ValueError(f"--resume {text}: expected cassandra:RUN_ID or cassandra:RUN_ID@EPOCH")
    return run_id, int(epoch) if epoch else None


def to_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes):
    # weights_only: a row in a shared database must not be able to run code in the trainer.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class CheckpointStore:
    def __init__(self, session: Session):
        self.session = session
        self.insert = session.prepare(
            "INSERT INTO checkpoints (run_id, epoch, upload_date, comments, network, optimizer, state) VALUES (?, ?, "
            "?, ?, ?, ?, ?)"
        )
        self.select_latest = session.prepare(
            "SELECT epoch, network, optimizer, state FROM checkpoints WHERE run_id = ? LIMIT 1"
        )
        self.select_epoch = session.prepare(
            "SELECT epoch, network, optimizer, state FROM checkpoints WHERE run_id = ? AND epoch = ?"
        )
        self.select_epochs = session.prepare("SELECT epoch FROM checkpoints WHERE run_id = ?")

    def save(self, run_id: str, state: TrainState, config: TrainConfig) -> None:
        checkpoint = state.checkpoint(config)
        network, optimizer = (to_bytes(checkpoint[key]) for key in SEPARATE)
        rest = to_bytes({key: value for key, value in checkpoint.items() if key not in SEPARATE})
        size = len(network) + len(optimizer) + len(rest)
        if size > MAX_ROW_BYTES:
            raise ValueError(
                f"checkpoint of {size:,} bytes is too large for one Cassandra row; use --checkpoints files"
            )
        last = state.history[-1] if state.history else None
        comment = (
            f"epoch {state.epoch}/{config.epochs}: train loss {last.train_loss:.4f}, val loss {last.val_loss:.4f}, "
            f"val accuracy {last.val_accuracy:.2%}"
            if last
            else f"epoch {state.epoch}/{config.epochs}"
        )
        self.session.execute(self.insert, (run_id, state.epoch, datetime.now(UTC), comment, network, optimizer, rest))

    def epochs(self, run_id: str) -> list[int]:
        return sorted(row[0] for row in self.session.execute(self.select_epochs, (run_id,)))

    def load(self, run_id: str, epoch: int | None = None) -> dict:
        """The TrainState.checkpoint() dict of a run's epoch (default: its last)."""
        if epoch is None:
            row = self.session.execute(self.select_latest, (run_id,)).one()
        else:
            row = self.session.execute(self.select_epoch, (run_id, epoch)).one()
        if row is None:
            saved = self.epochs(run_id)
            if not saved:
                raise ValueError(f"--resume {PREFIX}{run_id}: no checkpoints of a run {run_id} in the database")
            raise ValueError(
                f"--resume {PREFIX}{run_id}@{epoch}: run {run_id} has checkpoints of epochs "
                f"{', '.join(map(str, saved))}"
            )
        _, network, optimizer, rest = row
        checkpoint = from_bytes(rest)
        checkpoint["model_state_dict"], checkpoint["optimizer_state_dict"] = from_bytes(network), from_bytes(optimizer)
        return checkpoint
