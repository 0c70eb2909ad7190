"""Build the TorchServe model archive (mnist.mar) from the TorchScript model, the handler and its configuration."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HANDLER_DIR = Path(__file__).resolve().parent
MODEL_NAME = "mnist"  # served at /predictions/mnist
HANDLER = HANDLER_DIR / "mnist_handler.py"
# Unpacked beside the handler in the worker: the handler imports inputs.py, reads index_to_name.json.
EXTRA_FILES = (HANDLER_DIR / "inputs.py", HANDLER_DIR / "index_to_name.json")
MODEL_CONFIG = HANDLER_DIR / "model-config.yaml"
UNKNOWN_VERSION = "1.0"  # for a model trained outside git: TorchServe needs some version


class ArchiveError(Exception):
    """The archive cannot be built from what was given; the message says what to do."""


def version_from_metrics(metrics_path: Path) -> str:
    """The model's version: the commit its training code came from (metrics.json's git_commit, 12 hex
    digits, "-dirty" kept), so `GET /models/mnist` tells which code made the served weights."""
    try:
        commit = json.loads(metrics_path.read_text()).get("git_commit")
    except FileNotFoundError:
        raise ArchiveError(
            f"{metrics_path}: no such file; pass --version, or --metrics with the metrics.json training wrote"
        ) from None
    except (OSError, ValueError, AttributeError) as error:
        raise ArchiveError(f"{metrics_path}: not a metrics.json object ({error}); pass --version instead") from None
    if not commit or commit == "unknown":
        return UNKNOWN_VERSION
    clean, dirty, _ = str(commit).partition("-dirty")
    return clean[:12] + ("-dirty" if dirty else "")


def build_archive(model: Path, out_dir: Path, version: str) -> Path:
    """out_dir/mnist.mar around `model` (a TorchScript file), replaced whole: never half written."""
    if not model.is_file():
        raise ArchiveError(f"{model}: no such file; train a model first (make train)")
    if not zipfile.is_zipfile(model):  # TorchScript files are zip archives; pickled state dicts are not
        raise ArchiveError(f"{model}: not a TorchScript model; export one with torch.jit.script(model).save(path)")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The archiver's module rather than its script: in the training image it lies on PYTHONPATH,
    # apart from the venv whose bin/ holds the scripts.
    archiver = [sys.executable, "-m", "model_archiver.model_packaging"]
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".archive-") as staging:
        command = [
            *archiver,
            "--model-name",
            MODEL_NAME,
            "--version",
            version,
            "--serialized-file",
            str(model),
            "--handler",
            str(HANDLER),
            "--extra-files",
            ",".join(str(path) for path in EXTRA_FILES),
            "--config-file",
            str(MODEL_CONFIG),
            "--export-path",
            staging,
        ]
        # The archiver gathers the files in $TMPDIR/<model name> and deletes that folder first:
        # a private TMPDIR keeps two builds at once (make archive, a test run) from taking each other's.
        environment = {**os.environ, "TMPDIR": staging}
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        if done.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        target = out_dir / f"{MODEL_NAME}.mar"
        (Path(staging) / target.name).replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handler.archive", description=__doc__)
    parser.add_argument(
        "--model", type=Path, default=Path("artifacts/model.pt"), help="TorchScript model (default: %(default)s)"
    )
    parser.add_argument("--metrics", type=Path, help="metrics.json the version is taken from (default: beside --model)")
    parser.add_argument("--version", help="archive version (default: the git commit recorded in the metrics)")
    parser.add_argument(
        "--out", type=Path, default=Path("artifacts/model-store"), help="model store directory (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        version = args.version or version_from_metrics(args.metrics or args.model.with_name("metrics.json"))
        archive = build_archive(args.model, args.out, version)
    except ArchiveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {archive} (model {MODEL_NAME}, version {version}, {archive.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
