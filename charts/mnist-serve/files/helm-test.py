"""helm test: post a known MNIST digit (a 28x28 pixel array) to the release's Service and check the answer."""

import json
import os
import sys
import time
import urllib.error
import urllib.request

url = os.environ["PREDICT_URL"]
deadline = time.monotonic() + float(os.environ.get("TIMEOUT_SECONDS", "60"))
with open(os.environ.get("DIGIT_FILE", "/etc/mnist-serve-test/test-digit.json")) as handle:
    digit = json.load(handle)
body = json.dumps(digit["pixels"]).encode()

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

if answer.get("digit") != digit["label"]:
    sys.exit(f"FAIL: {url} read the {digit['label']} of {digit['source']} as {answer!r}")
print(f"ok: {url} read {digit['source']} as {answer['digit']} (confidence {answer['confidence']:.3f})")
