"""How request bodies become MNIST-style 28x28 images, and how bad ones are refused."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
from bodies import drawn_seven, encoded, png_claiming, zip_archive
from PIL import Image

from handler import inputs
from handler.inputs import BadInput, Limits, TooLarge, UnsupportedContent, decode_request

SAFETY_BOUND_S = 2.0  # refusing a hostile body must be quick; this is a safety bound, not a benchmark
DEFAULT_LIMITS = Limits()


# --- making test digits -------------------------------------------------------------------------


def mnist_style_one() -> np.ndarray:
    """A 28x28 uint8 "1" made the MNIST way by hand: 20 px tall, mass centred on (14, 14)."""
    patch = np.zeros((20, 6), dtype=np.uint8)
    patch[:, 2:4] = 255  # the stem
    patch[0:2, 0:2] = 160  # the flag
    patch[18:20, 4:6] = 255  # the foot
    patch[:, 1] = np.maximum(patch[:, 1], 60)  # an antialiased rim, as MNIST has
    row, col = centre_of_mass(patch)
    top, left = round(14 - row), round(14 - col)
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[top : top + 20, left : left + 6] = patch
    return digit


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    mass = image.sum()
    return (
        float(image.sum(axis=1) @ np.arange(image.shape[0]) / mass),
        float(image.sum(axis=0) @ np.arange(image.shape[1]) / mass),
    )


def ink_extent(image: np.ndarray, threshold: float = 0.1) -> tuple[int, int]:
    rows = np.flatnonzero((image > threshold).any(axis=1))
    cols = np.flatnonzero((image > threshold).any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def same_digit(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    """Nearly equal pixels, allowing a shift of one pixel (rounding of the centring)."""
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return min(np.abs(np.roll(a, shift, axis=(0, 1)) - b).mean() for shift in shifts) < tolerance


def one_image(body, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    decoded = decode_request(body, limits)
    assert decoded.images.shape == (1, 28, 28) and decoded.instances is False
    return decoded.images[0]


@pytest.fixture(scope="module")
def seven() -> np.ndarray:
    return one_image(encoded(drawn_seven()))


# --- images -------------------------------------------------------------------------------------


def test_a_canvas_drawing_is_fitted_into_20x20_and_centred_by_mass(seven):
    assert seven.dtype == np.float32 and seven.shape == (28, 28)
    assert seven.min() == 0.0 and seven.max() == 1.0  # white ink on black, full contrast
    assert max(ink_extent(seven)) == 20
    row, col = centre_of_mass(seven)
    assert abs(row - 14) <= 1 and abs(col - 14) <= 1


@pytest.mark.parametrize("image_format", ["JPEG", "BMP", "GIF", "WEBP"])
def test_every_common_format_reads_like_png(seven, image_format):
    image = one_image(encoded(drawn_seven(), image_format))
    assert same_digit(image, seven, 0.02)
    assert np.allclose(centre_of_mass(image), (14, 14), atol=1)


def test_white_on_black_and_black_on_white_are_the_same_digit(seven):
    assert np.array_equal(one_image(encoded(drawn_seven(ink=255, paper=0))), seven)


def test_an_off_centre_digit_is_moved_to_the_centre(seven):
    corner = one_image(encoded(drawn_seven(shift=(-60, -45))))
    assert np.array_equal(corner, seven)


def test_size_of_the_canvas_does_not_matter(seven):
    assert same_digit(one_image(encoded(drawn_seven(size=560))), seven, 0.03)
    assert same_digit(one_image(encoded(drawn_seven(size=100))), seven, 0.05)


def test_colour_ink_on_coloured_paper_reads_like_black_on_white(seven):
    colour = drawn_seven(mode="RGB", ink=(180, 20, 30), paper=(250, 245, 200))
    assert same_digit(one_image(encoded(colour)), seven, 0.02)


def test_a_transparent_canvas_counts_as_white_paper(seven):
    transparent = drawn_seven(mode="RGBA", ink=(0, 0, 0, 255), paper=(0, 0, 0, 0))
    assert np.array_equal(one_image(encoded(transparent)), seven)


def test_white_ink_on_a_transparent_canvas_is_still_seen(seven):
    transparent = drawn_seven(mode="RGBA", ink=(255, 255, 255, 255), paper=(255, 255, 255, 0))
    assert np.array_equal(one_image(encoded(transparent)), seven)


def test_a_photo_with_grey_paper_and_noise_reads_like_the_clean_drawing(seven):
    rng = np.random.default_rng(0)
    clean = np.asarray(drawn_seven(), dtype=np.float32)
    photo = 60 + clean * (170 - 60) / 255 + rng.normal(0, 6, clean.shape)  # grey ink, grey paper
    image = one_image(encoded(Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))))
    assert max(ink_extent(image, 0.3)) == 20
    assert same_digit(image, seven, 0.06)


def test_a_16_bit_png_reads_like_an_8_bit_one(seven):
    wide = np.asarray(drawn_seven(), dtype=np.uint16) * 257
    assert np.array_equal(one_image(encoded(Image.fromarray(wide))), seven)


def test_a_small_digit_is_scaled_up_to_the_20x20_box():
    tiny = drawn_seven(size=28).resize((14, 14))  # a 7 about 9 px tall
    canvas = Image.new("L", (28, 28), 255)
    canvas.paste(tiny, (3, 3))
    image = one_image(encoded(canvas))
    assert max(ink_extent(image, 0.5)) == 20  # the strokes fill the box...
    assert max(ink_extent(image, 0.1)) <= 22  # ...with at most a pixel of interpolated rim


def test_an_mnist_style_digit_comes_back_unchanged():
    digit = mnist_style_one()
    assert max(ink_extent(digit / 255.0, 0.0)) == 20  # the premise: already MNIST-style
    assert np.allclose(centre_of_mass(digit), (14, 14), atol=0.5)
    assert np.array_equal(one_image(encoded(Image.fromarray(digit))), digit / np.float32(255))


def test_real_mnist_digits_come_back_nearly_unchanged(mnist):
    digits = mnist.test_images
    sample = digits[:: len(digits) // 500]
    errors = np.array([np.abs(one_image(encoded(Image.fromarray(d))) - d / 255.0).max() for d in sample])
    # Unchanged but for the contrast stretch of digits whose darkest pixel is 254, not 255.
    assert (errors <= 1 / 254 + 1e-6).mean() >= 0.99


# --- JSON ---------------------------------------------------------------------------------------


def test_base64_json_reads_like_the_raw_image(seven):
    text = base64.b64encode(encoded(drawn_seven())).decode()
    assert np.array_equal(one_image(json.dumps({"data": text}).encode()), seven)
    assert np.array_equal(one_image({"data": text}), seven)  # TorchServe parsed application/json
    assert np.array_equal(one_image(json.dumps({"b64": text})), seven)  # text/* arrives as str
    assert np.array_equal(one_image({"data": "data:image/png;base64," + text}), seven)
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # MIME line breaks
    assert np.array_equal(one_image(bytearray(json.dumps({"data": wrapped}).encode())), seven)


def test_pixel_arrays_are_taken_as_given_in_either_scale():
    digit = mnist_style_one()
    digit[0, 0] = 255  # a pixel in the corner: no cropping or centring for arrays
    expected = digit / np.float32(255)
    assert np.array_equal(one_image(digit.tolist()), expected)
    assert np.array_equal(one_image(json.dumps(digit.tolist()).encode()), expected)
    assert np.array_equal(one_image(digit.reshape(-1).tolist()), expected)
    assert np.allclose(one_image({"data": (digit / 255.0).tolist()}), expected)
    assert np.allclose(one_image((digit / 255.0).reshape(-1).tolist()), expected)
    assert np.array_equal(one_image((digit.astype(float)).tolist()), expected)  # 0..255 floats


def test_an_all_zero_or_one_array_is_read_as_0_to_1():
    binary = np.zeros((28, 28), dtype=int)
    binary[5:20, 14] = 1
    assert one_image(binary.tolist()).max() == 1.0


def test_instances_decode_in_order_and_ask_for_predictions(seven):
    text = base64.b64encode(encoded(drawn_seven())).decode()
    digit = mnist_style_one()
    decoded = decode_request({"instances": [digit.tolist(), {"b64": text}, {"data": digit.reshape(-1).tolist()}, text]})
    assert decoded.instances is True
    assert decoded.images.shape == (4, 28, 28)
    assert np.array_equal(decoded.images[0], digit / np.float32(255))
    assert np.array_equal(decoded.images[1], seven)
    assert np.array_equal(decoded.images[2], digit / np.float32(255))
    assert np.array_equal(decoded.images[3], seven)


def test_a_batch_decodes_each_request_on_its_own(seven):
    batch = inputs.decode_batch([encoded(drawn_seven()), b"", {"instances": [[[0] * 28] * 28] * 2}])
    assert batch.images.shape == (3, 28, 28)
    assert np.array_equal(batch.images[0], seven)
    assert isinstance(batch.outcomes[1], BadInput)
    assert batch.outcomes[2].instances is True and len(batch.outcomes[2].images) == 2


# --- bad input ----------------------------------------------------------------------------------


def refused(body, limits: Limits = DEFAULT_LIMITS, content_type: str = "") -> BadInput:
    started = time.perf_counter()
    with pytest.raises(BadInput) as caught:
        decode_request(body, limits, content_type)
    assert time.perf_counter() - started < SAFETY_BOUND_S
    return caught.value


PIXELS = [[0] * 28] * 28


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"", 400, "the request body is empty"),
        (b" \n", 400, "the request body is empty"),
        ({}, 400, 'needs a "data" or "instances" field'),
        (b"what digit is this?", 415, "the body is plain text"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", 415, "the body is a PDF document"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "SVG must be rendered to PNG"),
        (b"II*\x00" + bytes(100), 415, "a TIFF image, which is not accepted"),
        (bytes(range(256)), 415, "binary data of an unknown type"),
        (b'{"data": ', 400, "the body is not valid JSON"),
        (b"[" * 100_000, 400, "nested too deeply"),
        ({"data": "not base64!"}, 400, "is not valid base64"),
        ({"data": base64.b64encode(b"seven").decode()}, 415, "the body is plain text"),
        ({"data": 7}, 400, "got a JSON number"),
        ({"instances": []}, 400, '"instances" must be a non-empty list'),
        ({"instances": "7"}, 400, '"instances" must be a non-empty list'),
        ({"instances": [PIXELS, [[0] * 28] * 27]}, 400, "instance 1: a pixel array must be 28 x 28"),
        ({"instances": [PIXELS] * 65}, 413, "65 instances in one request; the limit is 64"),
        ([[0] * 28] * 27, 400, "must be 28 x 28 (nested) or 784 numbers (flat); got 27 x 28"),
        ([0] * 783, 400, "got 783"),
        ([PIXELS], 400, "got 1 x 28 x 28"),
        ([[0] * 28] * 27 + [[0] * 27], 400, "in 28 rows of 28 or one flat list of 784"),
        ([[0] * 27 + ["1"]] * 28, 400, "must hold only numbers"),
        ([True] * 784, 400, "must hold only numbers"),
        ([0] * 783 + [float("nan")], 400, "found NaN or Infinity"),
        (b"[" + b"0, " * 783 + b"Infinity]", 400, "found NaN or Infinity"),
        ([0] * 783 + [-1], 400, "must lie in 0..255 (or 0..1); found -1 to 0"),
        ([0] * 783 + [256], 400, "found 0 to 256"),
        ([0] * 783 + [10**30], 400, "must hold only numbers"),
    ],
)
def test_bad_input_is_refused_with_a_reason(body, status, words):
    error = refused(body)
    assert error.status == status
    assert words in str(error)


def test_a_body_lost_to_form_decoding_says_to_set_the_content_type():
    # curl --data-binary without -H sends application/x-www-form-urlencoded; TorchServe then parses
    # the image as form fields and hands over nothing.
    for content_type in ("application/x-www-form-urlencoded", "Application/X-WWW-Form-Urlencoded; charset=utf-8"):
        error = refused(None, content_type=content_type)
        assert isinstance(error, UnsupportedContent)
        assert "-H 'Content-Type: application/octet-stream'" in str(error)
    assert "the request body is empty" in str(refused(None, content_type="image/png"))


def test_a_blank_image_has_no_digit():
    error = refused(encoded(Image.new("L", (280, 280), 255)))
    assert error.status == 400 and "no digit found" in str(error)
    assert "no digit found" in str(refused(encoded(Image.new("RGB", (28, 28), (9, 9, 9)))))


def test_noise_without_a_digit_is_refused():
    rng = np.random.default_rng(2)
    noise = rng.normal(128, 20, (200, 200)).clip(0, 255).astype(np.uint8)
    error = refused(encoded(Image.fromarray(noise)))
    assert error.status == 400 and "no digit found" in str(error)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_a_truncated_image_is_refused(image_format):
    whole = encoded(drawn_seven(), image_format)
    for cut in (len(whole) // 2, 20):  # cut in the pixel data, and in the header
        error = refused(whole[:cut])
        assert error.status == 400 and "truncated or corrupt" in str(error)


def test_a_zip_archive_is_refused():
    error = refused(zip_archive())
    assert isinstance(error, UnsupportedContent) and "a ZIP archive" in str(error)


def test_huge_dimensions_are_refused_from_the_header_alone():
    error = refused(png_claiming(10_000, 10_000))
    assert isinstance(error, TooLarge) and error.status == 413
    assert "10,000 x 10,000 pixels; the limit is 16,777,216" in str(error)


def test_a_decompression_bomb_is_refused_before_it_inflates(zip_bomb_png):
    assert len(zip_bomb_png) < 200_000
    error = refused(zip_bomb_png)
    assert isinstance(error, TooLarge) and "10,000 x 10,000" in str(error)
    assert "instance 0: the image is 10,000 x 10,000" in str(
        refused({"instances": [base64.b64encode(zip_bomb_png).decode()]})
    )


def test_pillows_own_bomb_guard_is_also_a_413():
    # With a limit above Pillow's (2 x 89 Mpx), Pillow refuses first and must still answer 413.
    error = refused(png_claiming(20_000, 20_000), Limits(max_image_pixels=10**9))
    assert isinstance(error, TooLarge)


def test_a_body_over_the_size_limit_is_refused():
    error = refused(encoded(drawn_seven()), Limits(max_body_bytes=100))
    assert isinstance(error, TooLarge) and "the limit is 100" in str(error)
    assert isinstance(refused(b"\x89PNG" + bytes(Limits().max_body_bytes)), TooLarge)
