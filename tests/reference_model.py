"""The model `make train` produces, trained once per change of the training code and cached outside the checkout."""

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from training.config import cache_dir

ROOT = Path(__file__).resolve().parent.parent
# The files that decide the weights; editing anything else reuses the cached model.
SOURCES = ("training/data.py", "training/model.py", "training/train.py", "training/export.py", "training/job.py")


def reference_model_dir() -> Path:
    """A directory holding model.pt and metrics.json of a default training run (trained here on a miss)."""
    key = hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in SOURCES)).hexdigest()[:16]
    out = cache_dir() / "reference-model" / key
    if not (out / "metrics.json").exists():  # written last: its presence means the run finished
        subprocess.run([sys.executable, "-m", "training", "train", "--out", str(out)], cwd=ROOT, check=True)
    return out


def same_but_for_times(one: Path, other: Path) -> bool:
    """Two model archives with the same files and bytes, apart from when they were made (the zip entries'
    times, the manifest's createdOn)."""

    def contents(path: Path) -> tuple[dict, dict]:
        with zipfile.ZipFile(path) as archive:
            files = {name: archive.read(name) for name in archive.namelist()}
        manifest = json.loads(files.pop("MAR-INF/MANIFEST.json"))
        manifest.pop("createdOn")
        return files, manifest

    return contents(one) == contents(other)
