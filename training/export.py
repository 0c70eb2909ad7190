"""TorchScript export, verified against the eager model on the whole test set."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

LOGIT_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported module does not behave like the model it came from."""


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """Scripted and frozen for inference: batch norm folded into the convolutions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice; TorchServe loads it natively
        return torch.jit.freeze(torch.jit.script(model.cpu().eval()))


@torch.inference_mode()
def verify(eager: nn.Module, exported: torch.jit.ScriptModule, images: torch.Tensor, batch_size: int = 1000) -> float:
    """Same predictions and logits within LOGIT_TOLERANCE on every image; returns the largest difference."""
    eager = eager.cpu().eval()
    worst = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        expected, got = eager(batch), exported(batch)
        difference = (expected - got).abs().max().item()
        worst = max(worst, difference)
        mismatched = (expected.argmax(1) != got.argmax(1)).sum().item()
        if mismatched or difference > LOGIT_TOLERANCE:
            raise ExportError(
                f"exported model disagrees with the eager model on images {start}..{start + len(batch) - 1}: "
                f"{mismatched} different predictions, logits differ by up to {difference:.2e} "
                f"(tolerance {LOGIT_TOLERANCE:.0e}); the TorchScript file was not written"
            )
    return worst


def export(model: nn.Module, images: torch.Tensor, path: Path) -> float:
    """Script, verify, then save to `path` (through a temporary name). Returns the largest logit difference."""
    exported = script(model)
    worst = verify(model, exported, images)
    tmp = path.with_name(f".{path.name}.tmp")
    exported.save(str(tmp))
    verify(model, load(tmp), images)  # what will be served is what was checked
    tmp.replace(path)
    return worst


def load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")
