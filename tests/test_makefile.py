"""What `make serve` would run, asked of GNU make itself (`make -n`): it never trains without saying so first, and
ARCHIVE=FILE.mar serves that archive with nothing built or trained."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINS = "-m training train"


def planned(*arguments: str) -> str:
    """The commands `make` would run, without running them."""
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_serve_without_a_model_says_it_trains_one_first(tmp_path):
    plan = planned("serve", f"ARTIFACTS={tmp_path}")
    notice = plan.find(f"no {tmp_path}/model.pt yet, so training one first")
    assert notice >= 0 and TRAINS in plan, plan
    assert notice < plan.index(TRAINS) < plan.index("-m handler.archive") < plan.index("-m handler.server"), plan


def test_serve_with_a_model_does_not_train(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"a model")
    plan = planned("serve", f"ARTIFACTS={tmp_path}")
    assert TRAINS not in plan and "-m handler.archive" in plan, plan


def test_serve_an_archive_builds_and_trains_nothing(tmp_path):
    archive = tmp_path / "demo" / "model-store" / "mnist.mar"
    plan = planned("serve", f"ARTIFACTS={tmp_path}", f"ARCHIVE={archive}")
    assert TRAINS not in plan and "-m handler.archive" not in plan, plan
    assert f"-m handler.server --archive {archive} " in plan, plan
