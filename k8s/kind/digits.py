"""Real MNIST test digits to a prediction URL in every input form the handler takes (PNG, JPEG and BMP bodies,
a JSON pixel array, {"data": base64 PNG}, {"instances": [...]} mixing both), each answer checked against its
label. k8s/kind-smoke.sh runs it through a port-forward to the kind cluster's serving pod. (Malformed bodies it
sends from inside the cluster: kubectl's port-forward gives up on the first connection the server resets.)

    python k8s/kind/digits.py http://127.0.0.1:PORT/predictions/mnist [--json FILE]

With --json, the counts also go to FILE, for the smoke test's summary:

    {"forms": {"PNG body": {"asked": 20, "answered": 20, "right": 20}, ...}, "asked": N, "answered": N, "right": N,
     "misses_allowed_per_form": 1}
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time

from handler.client import encoded, post
from training.data import load_mnist

COUNT = 20  # digits per form; the model reads > 98 % of the test set right, so allow one miss a form
MAX_MISSES = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the prediction URL, e.g. http://127.0.0.1:8080/predictions/mnist")
    parser.add_argument("--json", metavar="FILE", help="also write the counts per form to FILE")
    args = parser.parse_args(argv)
    mnist = load_mnist()
    images, labels = mnist.test_images[:COUNT], mnist.test_labels[:COUNT].tolist()
    wait_for_answer(args.url, encoded(images[0]))

    forms = {
        "PNG body": [(encoded(image), "image/png") for image in images],
        "JPEG body": [(encoded(image, "JPEG"), "image/jpeg") for image in images],
        "BMP body": [(encoded(image, "BMP"), "application/octet-stream") for image in images],
        "JSON pixel array": [(json.dumps(image.tolist()).encode(), "application/json") for image in images],
        'JSON {"data": base64 PNG}': [
            (json.dumps({"data": base64.b64encode(encoded(image)).decode()}).encode(), "application/json")
            for image in images
        ],
    }
    failures = []
    counts = {}
    for form, requests in forms.items():
        answers = []
        for body, content_type in requests:
            reply = post(args.url, body, content_type)
            right_form = reply.status == 200 and isinstance(reply.answer, dict)
            answers.append(reply.answer.get("digit") if right_form else f"HTTP {reply.status}")
        failures += report(form, answers, labels, counts)
    mixed = [base64.b64encode(encoded(image)).decode() if n % 2 else image.tolist() for n, image in enumerate(images)]
    reply = post(args.url, json.dumps({"instances": mixed}).encode(), "application/json")
    if reply.status == 200:
        answers = [item.get("digit") for item in reply.answer["predictions"]]
    else:
        answers = [f"HTTP {reply.status}"] * COUNT
    failures += report('JSON {"instances": [...]}, one request', answers, labels, counts)

    if args.json:
        totals = {key: sum(count[key] for count in counts.values()) for key in ("asked", "answered", "right")}
        with open(args.json, "w") as handle:
            json.dump({"forms": counts, **totals, "misses_allowed_per_form": MAX_MISSES}, handle)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def report(form: str, answers: list, labels: list[int], counts: dict) -> list[str]:
    """Prints the form's line and adds its counts to `counts`; returns its failure, if any."""
    misses = [
        (n, answer, label) for n, (answer, label) in enumerate(zip(answers, labels, strict=False)) if answer != label
    ]
    right = len(answers) - len(misses)
    answered = sum(isinstance(answer, int) for answer in answers)
    counts[form] = {"asked": len(labels), "answered": answered, "right": right}
    print(f"{'ok' if len(misses) <= MAX_MISSES else 'FAIL'}: {form}: {right}/{len(labels)} test digits read right")
    if len(misses) > MAX_MISSES or len(answers) != len(labels):
        return [f"{form}: test digits (index, answer, label) {misses}"]
    return []


def wait_for_answer(url: str, body: bytes, seconds: float = 60) -> None:
    """The port-forward takes a moment to listen."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if post(url, body, "image/png").status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"FAIL: no answer from {url} within {seconds:.0f} s")
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
