"""Writes the sample inputs of samples/ (real MNIST test digits, a canvas-style drawing, JSON bodies) that the
README's and the docs' examples send to the server. Run it again to regenerate them: the output is the same."""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
# MNIST test-set positions of the digits written as PNGs: the first 7, 2, 1, 0 and 4 of the test set.
DIGITS = {7: 0, 2: 1, 1: 2, 0: 3, 4: 4}
CANVAS_DIGIT, CANVAS_INDEX = 3, 32  # a plainly drawn 3, the model of `make train` reads it with confidence 1.000
CANVAS_SIDE = 280  # a browser canvas's size, ten times MNIST's


def test_digits() -> tuple[np.ndarray, np.ndarray]:
    """MNIST's 10,000 test images (28 x 28 uint8, white digit on black) and labels, from the project's cache."""
    sys.path.insert(0, str(ROOT))
    from training.data import load_mnist

    mnist = load_mnist()
    return mnist.test_images, mnist.test_labels


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def canvas_style(digit: np.ndarray) -> Image.Image:
    """A digit as a drawing on a canvas: dark strokes on white, CANVAS_SIDE pixels square, smoothly scaled."""
    return ImageOps.invert(Image.fromarray(digit)).resize((CANVAS_SIDE, CANVAS_SIDE), Image.Resampling.BICUBIC)


def samples(images: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
    """Every sample file's name and bytes."""
    files: dict[str, bytes] = {}
    for digit, index in DIGITS.items():
        assert labels[index] == digit, f"MNIST test image {index} is a {labels[index]}, not a {digit}"
        files[f"digit-{digit}.png"] = png(Image.fromarray(images[index]))
    assert labels[CANVAS_INDEX] == CANVAS_DIGIT
    files[f"canvas-{CANVAS_DIGIT}.png"] = png(canvas_style(images[CANVAS_INDEX]))
    # The JSON forms: 28 rows of 28 pixels (taken as given: white on black, 0..255), and one request of three
    # instances (a 28 x 28 array, a base64 PNG, a data: URL as a canvas's toDataURL() gives).
    rows = images[DIGITS[7]].tolist()
    files["digit-7.json"] = (json.dumps(rows, separators=(",", ":")) + "\n").encode()
    data_url = "data:image/png;base64," + base64.b64encode(files[f"canvas-{CANVAS_DIGIT}.png"]).decode()
    instances = [images[DIGITS[1]].tolist(), base64.b64encode(files["digit-2.png"]).decode(), data_url]
    files["instances.json"] = (json.dumps({"instances": instances}, separators=(",", ":")) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="PNGs: digit-D.png, 28 x 28, white on black as MNIST stores them; canvas-3.png, 280 x 280, dark on "
        "white. JSON: digit-7.json (28 x 28 pixel rows), instances.json (a 1 as pixels, digit-2.png as base64, "
        "canvas-3.png as a data: URL).",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "samples", help="directory to write into (default: samples/)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in samples(*test_digits()).items():
        (args.out / name).write_bytes(data)
        print(f"wrote {name} ({len(data):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
