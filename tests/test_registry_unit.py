"""The registry's pure parts: chunking, the metrics file, the archive check. No database needed."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from registry.names import VERSION_NAME
from registry.store import BadInput, check_archive, chunk_count, read_chunks, read_metrics, serialized_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "size, chunk_size, expected",
    [
        (0, 4, [0]),
        (1, 4, [1]),
        (4, 4, [4]),
        (5, 4, [4, 1]),
        (8, 4, [4, 4]),
        (9, 4, [4, 4, 1]),
        (3 << 20, 1 << 20, [1 << 20] * 3),
    ],
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


def test_the_chart_takes_the_version_names_the_registry_takes():
    """values.schema.json keeps its own copy of the rule (JSON Schema cannot import it); the two must agree."""
    schema = json.loads((ROOT / "charts" / "mnist-serve" / "values.schema.json").read_text())["properties"]
    assert schema["model"]["properties"]["version"]["pattern"] == f"^{VERSION_NAME.pattern}$"
    # Empty while no canary runs.
    assert schema["canary"]["properties"]["version"]["pattern"] == f"^$|^{VERSION_NAME.pattern}$"


def test_an_archive_whose_members_fail_their_crc_check_is_refused(tmp_path, model_archive):
    data = bytearray(model_archive.read_bytes())
    with zipfile.ZipFile(model_archive) as mar:
        info = mar.getinfo("model.pt")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2] ^= 0xFF
    damaged = tmp_path / "damaged.mar"
    damaged.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="damaged, model.pt fails its CRC check"):
        check_archive(damaged)
