"""The pieces of registry/rollout/ that need no cluster: the pin patch, the canary's Deployment, a pod's state in
words, the check digits, the command line. The rollouts themselves run on real pods in the kind smoke test."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pytest
from kubernetes import client

from registry.rollout import check, deployment
from registry.rollout.canary import canary_spec
from registry.store import ModelVersion

ROOT = check.CHECK_DIGITS.parent.parent


def version(name: str = "2", accuracy: float | None = 0.995) -> ModelVersion:
    return ModelVersion(
        version=name,
        created_at=datetime.now(UTC),
        archive_name="mnist.mar",
        size=1,
        sha256="0560663d9a3b" + "f" * 52,
        chunk_size=1,
        chunk_count=1,
        upload=None,
        test_accuracy=accuracy,
        test_loss=None,
        epochs=None,
        parameters={},
        data_fingerprint=None,
        git_commit=None,
        torch_version=None,
        metrics={},
    )


def stable_deployment() -> client.V1Deployment:
    """The shape the chart renders (the parts the rollout reads)."""
    labels = {
        "app.kubernetes.io/name": "mnist-serve",
        "app.kubernetes.io/instance": "mnist-serve",
        "app.kubernetes.io/component": "server",
    }
    container = client.V1Container(
        name="torchserve",
        image="mnist-serve:0.1.0-cpu",
        env=[
            client.V1EnvVar(name="MODEL_SOURCE", value="registry"),
            client.V1EnvVar(name="MODEL_VERSION", value="production"),
        ],
    )
    metadata = client.V1ObjectMeta(labels={**labels, deployment.TRACK: "stable"}, annotations={"checksum/config": "x"})
    template = client.V1PodTemplateSpec(metadata=metadata, spec=client.V1PodSpec(containers=[container]))
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name="mnist-serve", namespace="serving", labels=labels, uid="u1"),
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels=labels),
            template=template,
            revision_history_limit=5,
        ),
    )


def test_the_pin_sets_the_version_by_its_env_entry_and_annotates_the_pods():
    patch = deployment.pin(version("7"))
    template = patch["spec"]["template"]
    assert template["spec"]["containers"] == [{"name": "torchserve", "env": [{"name": "MODEL_VERSION", "value": "7"}]}]
    assert template["metadata"]["annotations"] == {
        deployment.VERSION_ANNOTATION: "7",
        deployment.SHA256_ANNOTATION: "0560663d9a3b",
    }


def test_the_canary_is_the_stable_pod_on_its_own_version_selected_apart():
    stable = stable_deployment()
    canary = canary_spec(stable, version("1"), 1)
    assert canary["metadata"]["name"] == "mnist-serve-canary" and canary["spec"]["replicas"] == 1
    assert canary["spec"]["selector"]["matchLabels"][deployment.TRACK] == "canary"
    assert canary["spec"]["template"]["metadata"]["labels"][deployment.TRACK] == "canary"
    (container,) = canary["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e["value"] for e in container["env"]} == {"MODEL_SOURCE": "registry", "MODEL_VERSION": "1"}
    # The stable Deployment is left as it was, and the Service's labels are still on the canary's pods.
    assert deployment.env_value(stable, "MODEL_VERSION") == "production"
    assert stable.spec.selector.match_labels.items() <= canary["spec"]["template"]["metadata"]["labels"].items()
    assert deployment.selector_of(stable, exclude_canary=True).endswith(f",{deployment.TRACK}!=canary")


def status(
    ready: bool,
    waiting: str | None = None,
    terminated: client.V1ContainerStateTerminated | None = None,
    restarts: int = 0,
):
    state = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(reason=waiting) if waiting else None)
    last = client.V1ContainerState(terminated=terminated)
    container = client.V1ContainerStatus(
        name="torchserve", image="i", image_id="", ready=ready, restart_count=restarts, state=state, last_state=last
    )
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="p"),
        status=client.V1PodStatus(phase="Running", container_statuses=[container]),
    )


def test_a_pod_is_described_and_a_failed_one_says_why():
    assert deployment.pod_line(status(True)) == ("running, ready", None)
    crashed = client.V1ContainerStateTerminated(
        exit_code=1, message="the model does not load: 3 workers failed to load mnist.mar: RuntimeError: x"
    )
    line, failure = deployment.pod_line(status(False, "CrashLoopBackOff", crashed, restarts=1))
    assert line == "running, not ready, CrashLoopBackOff, 1 restart"
    assert failure == "the model does not load: 3 workers failed to load mnist.mar: RuntimeError: x"
    stopped = client.V1ContainerStateTerminated(exit_code=0, reason="Completed")
    assert deployment.pod_line(status(False, terminated=stopped))[1] is None  # a clean exit is no failure


def test_the_check_digits_are_the_first_hundred_mnist_test_digits(mnist):
    images, labels = check.check_digits()
    assert images.dtype == np.uint8 and images.shape == (100, 28, 28)
    assert np.array_equal(images, mnist.test_images[:100]) and np.array_equal(labels, mnist.test_labels[:100])


@pytest.mark.parametrize(
    "args, message",
    [
        (["canary", "start", "--deployment", "deployment/x"], "canary start needs the VERSION to try"),
        (
            ["promote", "2", "--deployment", "statefulset/x"],
            "statefulset/x: only a Deployment can be rolled out (deployment/NAME)",
        ),
    ],
)
def test_rollout_commands_refuse_what_they_cannot_do_in_one_line(args, message, tmp_path):
    # Refused before anything reaches a database or a cluster (no Cassandra answers on port 1).
    env = {"CASSANDRA_PORT": "1", "CASSANDRA_CONNECT_TIMEOUT": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "registry.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {message}"]
