"""Turn one prediction request body into MNIST-style 28x28 images, or say what was wrong with it."""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

SIDE = 28  # MNIST images are 28 x 28
INK_BOX = 20  # MNIST fitted every digit into 20 x 20 before centring it in 28 x 28
# Where MNIST put the centre of mass, in pixel-index coordinates: the mean over the 10,000
# test digits is (13.99, 14.01) and every digit lies within half a pixel of (14, 14).
MASS_CENTRE = 14.0
# Ink fainter than this fraction of the darkest stroke does not widen the crop, so paper grain,
# shadows and JPEG ringing cannot. With it, 99.9 % of the MNIST test digits come back unchanged.
CROP_THRESHOLD = 0.1
CROP_MARGIN = 2  # pixels of the 28 x 28 result kept around the strong strokes for their faint rim
# Less contrast than this (on 0..1) between paper and darkest stroke is no digit at all.
MIN_CONTRAST = 0.1
# Only the formats browsers, phones and drawing tools produce. Pillow knows dozens more; each
# rarely used decoder is attack surface (EPS even runs Ghostscript), so they are not tried.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
# Largest side worked on in numpy; bigger photos are first shrunk by Pillow's fast integer
# reduce, which still leaves a digit covering a tenth of the photo ~100 px for the 20 px box.
WORKING_SIDE = 1024

WHAT_TO_SEND = (
    "send a PNG, JPEG, BMP, GIF or WebP image as the body, or JSON: "
    '{"data": "<base64 image>"}, a 28x28 (or flat 784) pixel array, '
    'or {"instances": [...]} with several of those'
)
_LOOKS_LIKE_JSON = re.compile(rb'\s*[\[{"]')
# curl -d / --data-binary label a body so unless told otherwise, and TorchServe then parses it
# into form fields: an image or JSON body arrives as no field at all.
FORM_URLENCODED = "application/x-www-form-urlencoded"


# Pillow warns above its own 89 Mpx bomb limit; ours is lower and checked after the header is read.
# Set once here: a catch_warnings() block per image would reset the warning registry on every request,
# and print any other once-only warning of the process again for each request.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class BadInput(ValueError):
    """The request cannot be answered as sent; the message says what was wrong and what to send."""

    status = 400
    reason = "Bad Request"


class TooLarge(BadInput):
    """The body, an image or the number of instances is over a limit."""

    status = 413
    reason = "Payload Too Large"


class UnsupportedContent(BadInput):
    """The body is neither an accepted image format nor JSON."""

    status = 415
    reason = "Unsupported Media Type"


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a worker; the defaults match handler/config.properties."""

    max_body_bytes: int = 1_048_576  # max_request_size in config.properties
    max_image_pixels: int = 4096 * 4096  # checked from the header, before anything is decoded
    max_instances: int = 64


@dataclass(frozen=True)
class DecodedRequest:
    """The images of one request, in order, and whether it asked in the {"instances": [...]} form."""

    images: np.ndarray  # K x 28 x 28 float32, 0..1, white digit on black like MNIST
    instances: bool  # True: answer {"predictions": [one answer per image]}


@dataclass(frozen=True)
class DecodedBatch:
    """Every request of one TorchServe batch, decoded: all their images stacked, and whose is which."""

    images: np.ndarray  # N x 28 x 28 float32: the images of every request that decoded, in order
    outcomes: tuple[DecodedRequest | Exception, ...]  # per request: its images, or why it failed


def decode_batch(bodies: Sequence[Any], limits: Limits = Limits(), content_types: Sequence[str] = ()) -> DecodedBatch:
    """Decode each body on its own, so one bad request fails alone and the rest are answered.
    content_types, when given, holds each request's Content-Type header ("" when it had none)."""
    outcomes: list[DecodedRequest | Exception] = []
    for index, body in enumerate(bodies):
        try:
            outcomes.append(decode_request(body, limits, content_types[index] if content_types else ""))
        except Exception as error:  # BadInput, or a bug here: either way only this request fails
            outcomes.append(error)
    images = [outcome.images for outcome in outcomes if isinstance(outcome, DecodedRequest)]
    stacked = np.concatenate(images) if images else np.empty((0, SIDE, SIDE), dtype=np.float32)
    return DecodedBatch(stacked, tuple(outcomes))


def decode_request(body: Any, limits: Limits = Limits(), content_type: str = "") -> DecodedRequest:
    """Decode a body as TorchServe hands it over: bytes, or str / dict / list already parsed."""
    if isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    if body is None or (isinstance(body, bytes) and not body.strip()):
        if content_type.partition(";")[0].strip().lower() == FORM_URLENCODED:
            raise UnsupportedContent(
                f"the body was sent as {FORM_URLENCODED} (what curl -d and --data-binary send unless "
                "told otherwise), which the server reads as form fields, so the image or JSON was lost: "
                "send it with a Content-Type header such as application/octet-stream, image/png or "
                "application/json (curl -H 'Content-Type: application/octet-stream' --data-binary @digit.png)"
            )
        raise BadInput(f"the request body is empty: {WHAT_TO_SEND}")
    if isinstance(body, bytes):
        if len(body) > limits.max_body_bytes:
            raise TooLarge(
                f"the request body is {len(body):,} bytes; the limit is {limits.max_body_bytes:,}: "
                "send a smaller image (a digit needs no more than a few hundred pixels a side)"
            )
        if not _LOOKS_LIKE_JSON.match(body):
            return DecodedRequest(image_to_mnist(body, limits)[np.newaxis], instances=False)
        body = parse_json(body)
    return decode_json(body, limits)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise BadInput("the JSON body is nested too deeply to be an image or a pixel array") from None
    except ValueError as error:  # also UnicodeDecodeError
        raise BadInput(f"the body is not valid JSON ({error}): {WHAT_TO_SEND}") from None


def decode_json(document: Any, limits: Limits) -> DecodedRequest:
    if isinstance(document, dict) and "instances" in document:
        instances = document["instances"]
        if not isinstance(instances, list) or not instances:
            raise BadInput('"instances" must be a non-empty list of images or pixel arrays')
        if len(instances) > limits.max_instances:
            raise TooLarge(
                f"{len(instances)} instances in one request; the limit is {limits.max_instances}: "
                "split them over several requests"
            )
        images = []
        for number, instance in enumerate(instances):
            try:
                images.append(decode_one(instance, limits))
            except BadInput as error:
                # Re-raised as the same class so a too-large instance still answers 413.
                raise type(error)(f"instance {number}: {error}") from None
        return DecodedRequest(np.stack(images), instances=True)
    return DecodedRequest(decode_one(document, limits)[np.newaxis], instances=False)


def decode_one(item: Any, limits: Limits) -> np.ndarray:
    """One image given in JSON: a pixel array, a base64 string, or {"data"/"b64": either}."""
    if isinstance(item, dict):
        for key in ("data", "b64"):
            if key in item:
                item = item[key]
                break
        else:
            raise BadInput(f'a JSON object needs a "data" or "instances" field: {WHAT_TO_SEND}')
    if isinstance(item, str):
        return image_to_mnist(decode_base64(item, limits), limits)
    if isinstance(item, list):
        return pixels_to_mnist(item)
    raise BadInput(f"expected a base64 image or a pixel array, got a JSON {_json_type(item)}: {WHAT_TO_SEND}")


def decode_base64(text: str, limits: Limits) -> bytes:
    if text.startswith("data:"):  # a data URL, as a browser canvas's toDataURL() gives
        text = text.partition(",")[2]
    if len(text) > limits.max_body_bytes * 4 // 3 + 4:
        raise TooLarge(f"the base64 image is over the {limits.max_body_bytes:,}-byte limit")
    try:
        # MIME encoders wrap lines; validate=True would refuse the newlines, so drop whitespace.
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadInput('the "data" string is not valid base64: send the image file\'s bytes base64-encoded') from None
    if not data:
        raise BadInput('the "data" string is empty: send the image file\'s bytes base64-encoded')
    return data


def pixels_to_mnist(values: list) -> np.ndarray:
    """A pixel array taken as given (already MNIST-style): 0..255 when any value is over 1, else 0..1."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, RecursionError):
        array = None  # ragged lists, which numpy refuses outright
    if array is None or array.dtype.kind not in "iuf":
        raise BadInput("a pixel array must hold only numbers, in 28 rows of 28 or one flat list of 784")
    if array.shape == (SIDE * SIDE,):
        array = array.reshape(SIDE, SIDE)
    elif array.shape != (SIDE, SIDE):
        shape = " x ".join(str(n) for n in array.shape) or "a single number"
        raise BadInput(f"a pixel array must be 28 x 28 (nested) or 784 numbers (flat); got {shape}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise BadInput("pixel values must be finite numbers; found NaN or Infinity")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise BadInput(f"pixel values must lie in 0..255 (or 0..1); found {low:g} to {high:g}")
    if high > 1:
        array /= 255.0
    return array


def image_to_mnist(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Decode image bytes and make them look like an MNIST digit."""
    return normalise_like_mnist(read_grayscale(data, limits))


def read_grayscale(data: bytes, limits: Limits) -> np.ndarray:
    """The image as H x W uint8 (255 = white), transparency composited on white."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        image_format = accepted_format(data)
        if image_format:
            raise BadInput(
                f"the {image_format} image is truncated or corrupt: send the complete, unmodified file"
            ) from None
        raise UnsupportedContent(f"unsupported content: the body is {describe_content(data)}; {WHAT_TO_SEND}") from None
    except Image.DecompressionBombError:
        raise TooLarge(f"the image is too large; the limit is {limits.max_image_pixels:,} pixels") from None
    except Exception as error:  # Pillow's header parsers raise many types on malformed files
        raise BadInput(
            f"the {accepted_format(data) or 'image'} image is truncated or corrupt ({error}): "
            "send the complete, unmodified file"
        ) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        side = math.isqrt(limits.max_image_pixels)
        raise TooLarge(
            f"the image is {width:,} x {height:,} pixels; the limit is {limits.max_image_pixels:,} "
            f"pixels (e.g. {side:,} x {side:,}): send a smaller image (a digit needs no more "
            "than a few hundred pixels a side)"
        )
    if width == 0 or height == 0:
        raise BadInput("the image has no pixels")
    try:
        if image.format == "JPEG":
            # libjpeg then decodes only the luminance, and big photos at 1/2..1/8 scale.
            image.draft("L", (WORKING_SIDE, WORKING_SIDE))
        image.load()
        reduction = max(image.size) // WORKING_SIDE
        if reduction > 1:
            image = image.reduce(reduction)
        return grayscale_pixels(image)
    except Exception as error:  # truncated or corrupt data: Pillow raises OSError, SyntaxError, ...
        raise BadInput(
            f"the {image.format} image is truncated or corrupt ({error}): send the complete, unmodified file"
        ) from None


def grayscale_pixels(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I"):  # 16-bit PNGs: convert("L") would clip rather than scale
        wide = np.asarray(image, dtype=np.uint32)
        return (wide >> 8 if wide.max() > 255 else wide).astype(np.uint8)
    if image.has_transparency_data:
        # Drawing apps export ink on a transparent canvas: what shows through is white paper,
        # unless the ink itself is white, when only a black backing shows it.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), rgba)
        if image.convert("L").getextrema()[0] > 255 * (1 - MIN_CONTRAST):
            image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), rgba)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image)


def normalise_like_mnist(gray: np.ndarray) -> np.ndarray:
    """Make an H x W uint8 grayscale picture of one digit look like MNIST: 28 x 28 float32 in 0..1.

    As MNIST was made: invert when the background (border) is light, subtract the background,
    crop to the ink, fit into 20 x 20 keeping the aspect ratio (antialiased), and place in
    28 x 28 with the centre of mass at the centre. An MNIST digit comes back unchanged.
    Passes over the full-size picture stay in uint8; floats appear only once it is 28 x 28.
    """
    border = np.sort(np.concatenate((gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1])))
    light_paper = bool(border[len(border) // 2] > 127)
    if light_paper:  # from here on, measure as ink: 0 = the paper, 255 = black
        border = 255 - border[::-1]
    # The 95th percentile of the border, not its median, so paper grain and JPEG noise go with
    # the background; a digit may still touch up to 5 % of the border without being taken for it.
    background = int(border[(len(border) - 1) * 95 // 100])
    # Strokes must stand out from the paper by more than the paper varies, or a noisy photo's
    # stray pixels would stretch the crop; a clean canvas or an MNIST image has no variation.
    paper_variation = background - int(border[len(border) // 2])
    strongest = 255 - int(gray.min()) if light_paper else int(gray.max())
    contrast = strongest - background
    if contrast < MIN_CONTRAST * 255:
        raise BadInput(
            "no digit found: the image is blank or has almost no contrast; send one dark digit on "
            "a light background or one light digit on a dark background"
        )
    cutoff = background + max(CROP_THRESHOLD * contrast, 2 * paper_variation)
    strong = gray < 255 - cutoff if light_paper else gray > cutoff
    rows = np.flatnonzero(strong.any(axis=1))
    if not len(rows):
        raise BadInput(
            "no digit found: nothing stands out from the background's own noise; send a sharper, "
            "better lit picture of one digit"
        )
    cols = np.flatnonzero(strong[rows[0] : rows[-1] + 1].any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    scale = INK_BOX / max(bottom - top, right - left)
    fitted = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
    # Exact per-axis scales, so the strong strokes land on whole pixels of the result and its
    # 20 x 20 box holds them exactly; the faint rim around them is kept in a frame of
    # CROP_MARGIN result pixels, as MNIST's antialiasing left one.
    scale_x, scale_y = fitted[0] / (right - left), fitted[1] / (bottom - top)
    margin_x, margin_y = CROP_MARGIN / scale_x, CROP_MARGIN / scale_y
    pad_x, pad_y = math.ceil(margin_x), math.ceil(margin_y)
    # The strong box and its frame, as ink; where the frame runs past the picture's edge, paper.
    ink = np.zeros((bottom - top + 2 * pad_y, right - left + 2 * pad_x), dtype=np.uint8)
    first_row, first_col = max(top - pad_y, 0), max(left - pad_x, 0)
    crop = gray[first_row : bottom + pad_y, first_col : right + pad_x]
    row0, col0 = first_row - (top - pad_y), first_col - (left - pad_x)
    table = ink_table(light_paper, background, contrast)
    ink[row0 : row0 + crop.shape[0], col0 : col0 + crop.shape[1]] = table[crop]
    size = (fitted[0] + 2 * CROP_MARGIN, fitted[1] + 2 * CROP_MARGIN)
    if size == (ink.shape[1], ink.shape[0]):
        digit = ink  # already 20 px in its long side, as MNIST digits are: no resampling at all
    else:
        # Shrinking averages the area each result pixel covers (antialiasing, as MNIST did);
        # enlarging a tiny digit interpolates instead of making blocks.
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        box = (
            pad_x - margin_x,
            pad_y - margin_y,
            pad_x + (right - left) + margin_x,
            pad_y + (bottom - top) + margin_y,
        )
        digit = np.asarray(Image.fromarray(ink).resize(size, resample, box=box))
    # Trim the empty part of the frame: only ink may limit where the digit can be placed.
    rows = np.flatnonzero(digit.any(axis=1))
    cols = np.flatnonzero(digit.any(axis=0))
    digit = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = digit.shape
    pixels = digit.astype(np.float32) / 255.0
    mass = float(pixels.sum())
    centre_row = float(pixels.sum(axis=1) @ np.arange(height)) / mass
    centre_col = float(pixels.sum(axis=0) @ np.arange(width)) / mass
    # Rounded half up, and kept inside the frame so no ink is lost for a lopsided digit.
    top = min(max(math.floor(MASS_CENTRE - centre_row + 0.5), 0), SIDE - height)
    left = min(max(math.floor(MASS_CENTRE - centre_col + 0.5), 0), SIDE - width)
    out = np.zeros((SIDE, SIDE), dtype=np.float32)
    out[top : top + height, left : left + width] = pixels
    return out


def accepted_format(data: bytes) -> str | None:
    """Which accepted image format the first bytes announce, if any."""
    for magic, name in IMAGE_SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:2] == b"BM" and data[6:10] == bytes(4):  # "BM", file size, then reserved zeros
        return "BMP"
    return None


@functools.lru_cache(maxsize=1024)
def ink_table(light_paper: bool, background: int, contrast: int) -> np.ndarray:
    """Grey level -> MNIST ink, as one lookup: invert light paper, subtract the background and
    stretch the strongest stroke to full white, as MNIST strokes are."""
    levels = np.arange(256, dtype=np.float32)
    if light_paper:
        levels = 255 - levels
    table = np.clip(np.rint((levels - background) * (255 / contrast)), 0, 255).astype(np.uint8)
    table.flags.writeable = False  # the cache shares it between calls
    return table


def describe_content(data: bytes) -> str:
    """A few words on what a body that is neither an accepted image nor JSON looks like."""
    head = data[:1024]
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "a ZIP archive"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "a TIFF image, which is not accepted"
    if head.lstrip().startswith(b"<"):
        return "XML or HTML (an SVG must be rendered to PNG first)"
    # "replace", not "strict": the 1 KiB cut may split a multi-byte character.
    text = head.decode("utf-8", errors="replace")
    if text.count("\ufffd") <= 1 and all(c.isprintable() or c.isspace() for c in text):
        return "plain text"
    return "binary data of an unknown type"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__
