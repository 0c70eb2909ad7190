"""mnist-predict: send digit images (or JSON pixel arrays) to the served model and print its answers."""

from __future__ import annotations

import argparse
import io
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

DEFAULT_URL = "http://127.0.0.1:8080/predictions/mnist"
TIMEOUT_S = 30.0


def encoded(image: np.ndarray, image_format: str = "PNG") -> bytes:
    """A digit (28 x 28 uint8 pixels) as the bytes of an image file, a request body the server reads."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, image_format)
    return buffer.getvalue()


class ServerUnreachable(ConnectionError):
    """Nothing answered at the URL: the server is down, starting, or the URL is wrong."""


class Reply(NamedTuple):
    status: int
    answer: Any  # the JSON answer, an error's too
    headers: Mapping[str, str]  # x-request-id names the request in TorchServe's logs


def post(url: str, body: bytes, content_type: str = "application/octet-stream", timeout: float = TIMEOUT_S) -> Reply:
    """POST one body and return the server's reply, 4xx and 5xx included; raises ServerUnreachable."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return Reply(answer.status, parse(answer.read()), answer.headers)
    except urllib.error.HTTPError as error:  # 4xx and 5xx still carry the server's explanation
        with error:
            text = error.read()
        # The frontend refuses an over-size body with an empty 413: its reason phrase is all there is.
        return Reply(
            error.code, parse(text) if text.strip() else {"error": f"{error.code} {error.reason}"}, error.headers
        )
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ServerUnreachable(
            f"no answer from {url} ({reason}); is the server running? `make serve` starts it"
        ) from None


def parse(text: bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # a proxy's HTML error page, say
        return {"error": text.decode("utf-8", errors="replace").strip()}


def content_type_of(path: Path) -> str:
    """JSON files hold pixel arrays or {"instances": [...]}; anything else is sent as image bytes."""
    return "application/json" if path.suffix.lower() == ".json" else "application/octet-stream"


def describe(answer: Any) -> str:
    """`7 (confidence 0.998)` for one image, one such per line for {"predictions": [...]}."""
    if isinstance(answer, dict) and isinstance(answer.get("predictions"), list):
        return "\n".join(f"  [{number}] {describe(item)}" for number, item in enumerate(answer["predictions"]))
    return f"{answer['digit']} (confidence {answer['confidence']:.3f})"


def error_message(answer: Any) -> str:
    """Our handler says {"error": ...}; TorchServe's own refusals (404, 413, 503) say {"message": ...}."""
    if isinstance(answer, dict):
        return str(answer.get("error") or answer.get("message") or answer)
    return str(answer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-predict", description=__doc__)
    parser.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help='PNG/JPEG/BMP/GIF/WebP image, or .json (pixel array, {"data": base64}, {"instances": [...]})',
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="prediction endpoint (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer, one line per file")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            body = path.read_bytes()
        except OSError as error:
            print(f"error: {path}: {error.strerror}", file=sys.stderr)
            failed += 1
            continue
        try:
            status, answer, _ = post(args.url, body, content_type_of(path))
        except ServerUnreachable as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        if status != 200:
            print(f"error: {path}: the server answered {status}: {error_message(answer)}", file=sys.stderr)
            failed += 1
        elif args.json:
            print(json.dumps(answer))
        else:
            separator = "\n" if isinstance(answer, dict) and "predictions" in answer else " "
            print(f"{path}:{separator}{describe(answer)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
