"""The check of real predictions: the first 100 MNIST test digits through one pod, whose answers must name the
version and its archive checksum and read enough digits right."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import numpy as np

from registry.rollout.errors import RolloutFailed
from registry.rollout.pod_http import pod_request
from registry.store import ModelVersion

CHECK_DIGITS = Path(__file__).parent.parent / "check-digits.npz"  # the first 100 MNIST test digits and their labels
PER_REQUEST = 50  # instances per check request (the handler takes up to 64)
ACCURACY_MARGIN = 0.02  # below the version's recorded test accuracy (99.5 % -> 97.5 % on 100 digits)
DEFAULT_ACCURACY = 0.9  # for a version published without a test accuracy


def check_digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(CHECK_DIGITS) as data:
        return data["images"], data["labels"]


def check_pod(core, pod, version: ModelVersion) -> str:
    """Real test digits through one pod: each answer must name VERSION and its checksum; returns the accuracy line.
    RolloutFailed when an answer is an error, has another shape or version, or accuracy is below the version's own."""
    images, labels = check_digits()
    minimum = (version.test_accuracy - ACCURACY_MARGIN) if version.test_accuracy is not None else DEFAULT_ACCURACY
    read_right = 0
    for start in range(0, len(images), PER_REQUEST):
        chunk = images[start : start + PER_REQUEST]
        body = json.dumps({"instances": chunk.tolist()}).encode()
        try:
            status, headers, answer = pod_request(core, pod, "/predictions/mnist", body)
        except (OSError, http.client.HTTPException) as error:
            raise RolloutFailed(f"pod {pod.metadata.name} did not answer: {error}") from None
        if status != 200:
            raise RolloutFailed(f"pod {pod.metadata.name} answered {status}: {answer[:200].decode(errors='replace')}")
        try:
            parsed = json.loads(answer)
            digits = [int(item["digit"]) for item in parsed["predictions"]]
            served = parsed["model"]
        except (ValueError, KeyError, TypeError):
            raise RolloutFailed(
                f"pod {pod.metadata.name} answered in another shape: {answer[:200].decode(errors='replace')}"
            ) from None
        if len(digits) != len(chunk):
            raise RolloutFailed(f"pod {pod.metadata.name} answered {len(digits)} predictions for {len(chunk)} images")
        said = (served.get("version"), served.get("sha256"), headers.get("x-model-version"))
        if said != (version.version, version.short_sha256, version.version):
            raise RolloutFailed(
                f"pod {pod.metadata.name} serves version {said[0]} (sha256 {said[1]}), not {version.version}"
            )
        read_right += int(np.sum(np.array(digits) == labels[start : start + PER_REQUEST]))
    accuracy = read_right / len(images)
    if accuracy < minimum:
        raise RolloutFailed(
            f"pod {pod.metadata.name} read {accuracy:.0%} of {len(images)} test digits right, "
            f"below {minimum:.1%} (the version's test accuracy less {ACCURACY_MARGIN:.0%})"
        )
    return f"{read_right}/{len(images)} test digits right, version {version.version} sha256 {version.short_sha256}"
