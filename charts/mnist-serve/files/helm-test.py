"""helm test: post a known MNIST digit to the release's Service, as the API takes it (digit-7.json, 28 rows of 28
pixels), and check the answer."""

import json
import os
import sys
import time
import urllib.error
import urllib.request

url = os.environ["PREDICT_URL"]
deadline = time.monotonic() + float(os.environ.get("TIMEOUT_SECONDS", "60"))
digit_file = os.environ.get("DIGIT_FILE", "/etc/mnist-serve-test/digit-7.json")
expected = int(os.environ.get("EXPECTED_DIGIT", "7"))
with open(digit_file, "rb") as handle:
    body = handle.read()

while True:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            answer = json.load(reply)
        break
    except (urllib.error.URLError, OSError) as error:  # no ready endpoint yet, or a 5xx while a worker restarts
        if time.monotonic() > deadline:
            sys.exit(f"FAIL: no answer from {url}: {error}")
        time.sleep(2)

if answer.get("digit") != expected:
    sys.exit(f"FAIL: {url} read the {expected} of {digit_file} (an MNIST test digit) as {answer!r}")
print(f"ok: {url} read the {expected} of {digit_file} as {answer['digit']} (confidence {answer['confidence']:.3f})")
