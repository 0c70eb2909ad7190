"""MNIST loading: IDX parsing, the checks that catch corrupt files, and the cached real data."""

import gzip
import struct

import numpy as np
import pytest

from training.data import (
    IDX_FILES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    DataError,
    IdxDirectory,
    load_mnist,
    read_idx,
    write_idx,
)


def write_dataset(directory, train=12, test=5, gz=False):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, test, dtype=np.uint8),
    }
    for key, stem in IDX_FILES.items():
        write_idx(directory / stem, arrays[key])
        if gz:
            path = directory / stem
            (directory / (stem + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_round_trips(tmp_path, gz):
    arrays = write_dataset(tmp_path, gz=gz)
    mnist = IdxDirectory(tmp_path).load()
    for key, array in arrays.items():
        np.testing.assert_array_equal(getattr(mnist, key), array)


def test_fingerprint_changes_with_one_pixel(tmp_path):
    write_dataset(tmp_path)
    mnist = IdxDirectory(tmp_path).load()
    before = mnist.fingerprint()
    images = mnist.train_images.copy()
    images[0, 0, 0] ^= 1
    altered = type(mnist)(images, mnist.train_labels, mnist.test_images, mnist.test_labels, "x")
    assert altered.fingerprint() != before
    assert IdxDirectory(tmp_path).load().fingerprint() == before


def test_wrong_magic_number_is_named(tmp_path):
    write_dataset(tmp_path)
    # An image file where a label file belongs.
    (tmp_path / "train-labels-idx1-ubyte").write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes())
    with pytest.raises(DataError, match=r"magic number 0x00000803, expected 0x00000801.*label file"):
        IdxDirectory(tmp_path).load()


def test_truncated_file_is_refused(tmp_path):
    write_dataset(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated or corrupt"):
        IdxDirectory(tmp_path).load()


def test_corrupt_gzip_is_refused(tmp_path):
    write_dataset(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match="corrupt gzip"):
        IdxDirectory(tmp_path).load()


def test_label_count_must_match_images(tmp_path):
    write_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, dtype=np.uint8))
    with pytest.raises(DataError, match="12 train images but 11 labels"):
        IdxDirectory(tmp_path).load()


def test_images_must_be_28_by_28(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(struct.pack(">IIII", IMAGES_MAGIC, 2, 27, 28) + bytes(2 * 27 * 28))
    with pytest.raises(DataError, match="27x28"):
        read_idx(path, IMAGES_MAGIC)


def test_missing_file_says_what_is_expected(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no such file; expected the four MNIST IDX files"):
        IdxDirectory(tmp_path).load()


def test_short_file_is_refused(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="too short"):
        read_idx(path, LABELS_MAGIC)


def test_real_mnist_counts_and_cache():
    """The real data set, from whichever route supplied it; the second call reads the cache."""
    mnist = load_mnist()
    assert mnist.train_images.shape == (60_000, 28, 28) and mnist.test_images.shape == (10_000, 28, 28)
    assert mnist.train_images.dtype == np.uint8 and mnist.train_images.max() == 255
    # The first labels of the original training and test files.
    assert mnist.train_labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert mnist.test_labels[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert np.bincount(mnist.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert load_mnist().fingerprint() == mnist.fingerprint()
