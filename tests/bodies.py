"""Request bodies the tests send: a digit drawn as on a web canvas, MNIST digits as image files, and hostile
PNGs and archives."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image, ImageDraw


def drawn_seven(size: int = 280, ink=0, paper=255, mode: str = "L", shift=(0, 0)) -> Image.Image:
    """A thick "7", the way someone draws it on a web canvas: dark ink on white by default."""
    image = Image.new(mode, (size, size), paper)
    k = size / 280
    dx, dy = shift
    points = [(80 * k + dx, 60 * k + dy), (200 * k + dx, 60 * k + dy), (115 * k + dx, 230 * k + dy)]
    ImageDraw.Draw(image).line(points, fill=ink, width=max(1, round(22 * k)), joint="curve")
    return image


def encoded(image: Image.Image | np.ndarray, image_format: str = "PNG", **options) -> bytes:
    """An image (or 28 x 28 uint8 digit pixels) as the bytes of an image file; options go to Pillow's save."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG that claims width x height grey pixels: all a reader needs to
    know the size, and a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG that claims width x height pixels."""
    pixels = png_chunk(b"IDAT", zlib.compress(bytes(64)))
    return png_header(width, height) + pixels + png_chunk(b"IEND", b"")


def zip_bomb() -> bytes:
    """A valid PNG of 10,000 x 10,000 black pixels: ~100 KB that inflates to 100 MB."""
    compressor = zlib.compressobj(9)
    row = bytes(10_001)  # filter byte + 10,000 pixels
    data = b"".join(compressor.compress(row) for _ in range(10_000)) + compressor.flush()
    return png_header(10_000, 10_000) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def zip_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("digit.png", encoded(drawn_seven()))
    return buffer.getvalue()
