"""A big model archive for publishes that must take many chunks: the soak cuts one off mid-way, and the
registry tests kill or interrupt theirs. A module of its own so those tests need none of the soak's load code."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from registry.model_archive import MANIFEST


def big_archive(path: Path, megabytes: int) -> Path:
    """A valid .mar (a zip with TorchServe's manifest) holding incompressible bytes, so a publish takes many chunks."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        manifest = {"model": {"modelName": "mnist", "serializedFile": "model.pt"}}
        archive.writestr(MANIFEST, json.dumps(manifest))
        with archive.open("model.pt", "w") as member:
            for start in range(0, megabytes, 8):  # 8 MiB at a time: a big one never sits in memory whole
                member.write(os.urandom(min(8, megabytes - start) << 20))
    return path
