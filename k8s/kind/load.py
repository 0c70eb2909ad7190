"""The load loop of k8s/kind-smoke.sh, run in a pod of the kind cluster (the serving image, the standard
library only): posts a real MNIST digit to the Service from WORKERS connections, one request at a time
each, until STOP_FILE appears or --max-seconds pass, counting every request. Then one JSON line:

    {"requests": N, "answered": N, "failed": N, "dropped": N, "longest_gap_s": S, "versions": {...}, "errors": {...}}

failed: an answer that is not 200 with the right digit; dropped: no answer at all (refused, reset, timed
out); longest_gap_s: the longest time without a right answer, the first second of the run included;
versions: right answers per model version that answered them (the answer's "model"). Each request is a
connection of its own, so the Service spreads them over its pods as it spreads connections.

With --bad-bodies instead: malformed bodies once each, which must get a 4xx with a reason, then the digit,
which must get its right answer; a line for each, then one JSON line,

    {"statuses": {"a truncated PNG": 400, ...}, "refused_with_a_reason": N, "malformed": N, "digit_after": true}

and exits 1 if any is not as it must be.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import threading
import time
import urllib.error
import urllib.request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the Service's prediction URL")
    parser.add_argument("--digit", required=True, help="a digit as the API takes it: a JSON file of 28 x 28 pixels")
    parser.add_argument("--label", type=int, required=True, help="the digit it shows")
    parser.add_argument("--workers", type=int, default=2, help="connections, each one request at a time (2)")
    parser.add_argument("--stop-file", default="/tmp/stop", help="stop when this file exists (/tmp/stop)")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop after this long in any case (900)")
    parser.add_argument("--timeout", type=float, default=10, help="seconds one request may take (10)")
    parser.add_argument("--bad-bodies", action="store_true", help="check the answers to malformed bodies instead")
    args = parser.parse_args()
    with open(args.digit, "rb") as handle:
        body = handle.read()
    # Counting starts at the first right answer: the NetworkPolicy admits a new pod's address within seconds.
    deadline = time.monotonic() + 60
    while not right_answer(args.url, body, args.label, args.timeout):
        if time.monotonic() > deadline:
            raise SystemExit(f"no right answer from {args.url} within 60 s")
        time.sleep(1)
    if args.bad_bodies:
        raise SystemExit(check_bad_bodies(args.url, body, args.label, args.timeout))

    lock = threading.Lock()
    counts = collections.Counter()
    errors = collections.Counter()
    versions = collections.Counter()
    start = time.monotonic()
    state = {"last_right": start, "longest_gap": 0.0}
    done = threading.Event()

    def record(outcome: str, error: str = "", version: str = "") -> None:
        now = time.monotonic()
        with lock:
            counts["requests"] += 1
            counts[outcome] += 1
            if error:
                errors[error[:120]] += 1
            if version:
                versions[version] += 1
            if outcome == "answered":
                state["longest_gap"] = max(state["longest_gap"], now - state["last_right"])
                state["last_right"] = now

    def worker() -> None:
        while not done.is_set():
            try:
                status, answer = post(args.url, body, "application/json", args.timeout)
            except OSError as error:  # URLError too
                record("dropped", str(getattr(error, "reason", error)))
                continue
            if status == 200 and answer.get("digit") == args.label:
                record("answered", version=str(answer.get("model", {}).get("version", "?")))
            else:
                record("failed", f"HTTP {status}: {str(answer)[:80]}")

    start = time.monotonic()
    state["last_right"] = start
    print(f"counting from the first right answer, {args.workers} connections", flush=True)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
    for thread in threads:
        thread.start()
    next_report = start + 10
    while not os.path.exists(args.stop_file) and time.monotonic() - start < args.max_seconds:
        time.sleep(0.2)
        if time.monotonic() >= next_report:
            next_report += 10
            with lock:
                print(
                    f"{time.monotonic() - start:5.0f} s: {counts['requests']} requests, {counts['failed']} failed, "
                    f"{counts['dropped']} dropped",
                    flush=True,
                )
    done.set()
    for thread in threads:
        thread.join(args.timeout + 1)
    now = time.monotonic()
    with lock:
        summary = {
            "requests": counts["requests"],
            "answered": counts["answered"],
            "failed": counts["failed"],
            "dropped": counts["dropped"],
            "seconds": round(now - start, 1),
            "longest_gap_s": round(max(state["longest_gap"], now - state["last_right"]), 2),
            "versions": dict(versions),
            "errors": dict(errors),
        }
    print(json.dumps(summary), flush=True)


def post(url: str, body: bytes, content_type: str, timeout: float) -> tuple[int, dict]:
    """Status and JSON answer, 4xx and 5xx included; raises OSError when nothing answers."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as error:
        with error:
            text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:  # the frontend's own refusals (an over-size body) have no JSON
            return error.code, {"error": text.decode(errors="replace") or error.reason}


def right_answer(url: str, body: bytes, label: int, timeout: float) -> bool:
    try:
        status, answer = post(url, body, "application/json", timeout)
    except OSError:
        return False
    return status == 200 and answer.get("digit") == label


def check_bad_bodies(url: str, good: bytes, label: int, timeout: float) -> int:
    bad = {
        "a truncated PNG": (b"\x89PNG\r\n\x1a\n not really a PNG", "image/png"),
        "an empty body": (b"", "image/png"),
        "a 27 x 28 pixel array": (json.dumps(json.loads(good)[1:]).encode(), "application/json"),
        "plain text": (b"seven", "text/plain"),
    }
    statuses = {}
    refused = 0
    for name, (body, content_type) in bad.items():
        status, answer = post(url, body, content_type, timeout)
        statuses[name] = status
        right = 400 <= status < 500 and bool(answer.get("error"))
        refused += right
        print(f"{'ok' if right else 'FAIL'}: {name}: HTTP {status}, {str(answer.get('error', answer))[:100]}")
    digit_after = right_answer(url, good, label, timeout)
    print(f"{'ok' if digit_after else 'FAIL'}: then the test digit: {'' if digit_after else 'not '}read right")
    print(
        json.dumps(
            {"statuses": statuses, "refused_with_a_reason": refused, "malformed": len(bad), "digit_after": digit_after}
        ),
        flush=True,
    )
    return 0 if refused == len(bad) and digit_after else 1


if __name__ == "__main__":
    main()
