"""`python -m handler.archive`: the model archive TorchServe loads, built by the real torch-model-archiver."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from reference_model import reference_model_dir, same_but_for_times

from handler.archive import UNKNOWN_VERSION, version_from_metrics

ROOT = Path(__file__).resolve().parents[1]


def archive_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "handler.archive", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_the_archive_holds_the_model_the_handler_and_its_configuration(tmp_path):
    model = reference_model_dir()
    done = archive_cli("--model", str(model / "model.pt"), "--out", str(tmp_path / "store"))
    assert done.returncode == 0, done.stderr
    archive = tmp_path / "store" / "mnist.mar"
    assert f"wrote {archive}" in done.stdout
    assert [path.name for path in (tmp_path / "store").iterdir()] == ["mnist.mar"]  # no staging left behind
    with zipfile.ZipFile(archive) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        assert manifest["modelName"] == "mnist"
        assert manifest["modelVersion"] == version_from_metrics(model / "metrics.json")
        assert (manifest["serializedFile"], manifest["handler"], manifest["configFile"]) == (
            "model.pt",
            "mnist_handler.py",
            "model-config.yaml",
        )
        assert mar.read("model.pt") == (model / "model.pt").read_bytes()
        for name in ("mnist_handler.py", "inputs.py", "index_to_name.json", "model-config.yaml"):
            assert mar.read(name) == (ROOT / "handler" / name).read_bytes()
        assert yaml.safe_load(mar.read("model-config.yaml"))["batchSize"] == 32


def test_the_version_is_the_training_commit(tmp_path):
    metrics = tmp_path / "metrics.json"
    for commit, version in [
        ("1d54ceea452f2195a352ef479ad44fc16aaaaaaa", "1d54ceea452f"),
        ("1d54ceea452f2195a352ef479ad44fc16aaaaaaa-dirty", "1d54ceea452f-dirty"),
        ("unknown", UNKNOWN_VERSION),
    ]:
        metrics.write_text(json.dumps({"git_commit": commit}))
        assert version_from_metrics(metrics) == version


def test_a_version_flag_wins_over_the_metrics(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"not a model")
    done = archive_cli("--model", str(model), "--version", "7.1", "--out", str(tmp_path))
    # The flag spares the metrics lookup (there is no metrics.json here); the model is what fails.
    assert done.returncode == 1 and "metrics" not in done.stderr and "not a TorchScript model" in done.stderr


def test_a_missing_model_says_to_train_first(tmp_path):
    done = archive_cli("--model", str(tmp_path / "model.pt"), "--version", "1", "--out", str(tmp_path))
    assert done.returncode == 1 and "make train" in done.stderr
    missing_metrics = archive_cli("--model", str(tmp_path / "model.pt"), "--out", str(tmp_path))
    assert missing_metrics.returncode == 1 and "pass --version" in missing_metrics.stderr


def test_archives_made_at_other_times_are_the_same_and_any_other_difference_is_not(archive, tmp_path):
    """What lets a test session reuse the last session's archive bytes (conftest's archive fixture)."""

    def copy(name: str, change=lambda entry, data: data) -> Path:
        """The archive with its times moved to 2030 and change(entry, data) applied to each entry."""
        path = tmp_path / name
        with zipfile.ZipFile(archive) as original, zipfile.ZipFile(path, "w") as moved:
            for entry in original.namelist():
                data = original.read(entry)
                if entry == "MAR-INF/MANIFEST.json":
                    data = json.dumps({**json.loads(data), "createdOn": "01/01/2030 00:00:00"}).encode()
                moved.writestr(zipfile.ZipInfo(entry, date_time=(2030, 1, 1, 0, 0, 0)), change(entry, data))
        return path

    assert same_but_for_times(archive, copy("later.mar"))
    assert not same_but_for_times(
        archive, copy("model.mar", lambda entry, data: data + b"\0" if entry == "model.pt" else data)
    )
    assert not same_but_for_times(
        archive, copy("version.mar", lambda entry, data: data.replace(b'"modelVersion": "', b'"modelVersion": "v'))
    )
