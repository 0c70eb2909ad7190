"""The registry's pure parts: chunking, the metrics file, the archive check. No database needed."""
from __future__ import annotations

import io
import json
import zipfile

import pytest

from registry.store import BadInput, check_archive, chunk_count, read_chunks, read_metrics, serialized_file


@pytest.mark.parametrize(
    "size, chunk_size, expected",
    [(0, 4, [0]), (1, 4, [1]), (4, 4, [4]), (5, 4, [4, 1]), (8, 4, [4, 4]), (9, 4, [4, 4, 1]), (3 << 20, 1 << 20, [1 << 20] * 3)],
)
def test_chunks_cover_the_file_in_order(size, chunk_size, expected):
    data = bytes(i % 251 for i in range(size))
    chunks = list(read_chunks(io.BytesIO(data), chunk_size))
    assert [len(c) for c in chunks] == expected
    assert b"".join(chunks) == data
    assert chunk_count(size, chunk_size) == len(chunks)


def test_metrics_must_carry_what_the_registry_records(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"test_accuracy": 0.99, "epochs": 8}))
    with pytest.raises(BadInput, match="lacks test_loss, parameters, data_fingerprint, git_commit, torch_version"):
        read_metrics(path)
    path.write_text("[1, 2]")
    with pytest.raises(BadInput, match="expected a JSON object"):
        read_metrics(path)
    with pytest.raises(BadInput, match="no such file"):
        read_metrics(tmp_path / "missing.json")


def test_only_model_archives_are_accepted(tmp_path, model_archive):
    check_archive(model_archive)
    not_zip = tmp_path / "model.mar"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(BadInput, match="not a model archive"):
        check_archive(not_zip)
    plain_zip = tmp_path / "plain.mar"
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("model.pt", b"weights")
    with pytest.raises(BadInput, match="without MAR-INF/MANIFEST.json"):
        check_archive(plain_zip)


def test_the_model_file_comes_out_of_the_archive(model_archive, tmp_path):
    name, data = serialized_file(model_archive.read_bytes())
    assert name == "model.pt"
    assert data == (model_archive.parent / "model.pt").read_bytes()
