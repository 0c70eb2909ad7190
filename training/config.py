"""Where the training side keeps what it downloads and builds: one cache folder outside the checkout."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Downloads and builds live outside the checkout so a fresh clone reuses them."""
    return Path(os.environ.get("MNIST_SERVE_CACHE", Path.home() / ".cache" / "mnist-serve"))
