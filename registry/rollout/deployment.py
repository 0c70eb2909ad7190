"""The Deployment a rollout changes: where it is, its serving container, the pin of its pods to a version, its
current pods and their state in words, and the wait until a rollout of it is done."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from registry.rollout.errors import RolloutError, RolloutFailed
from registry.rollout.kube import api_error
from registry.store import ModelVersion

CONTAINER = "torchserve"  # the chart's serving container
TRACK = "mnist-serve.io/track"  # stable or canary, on the pods (the chart's and those the canary makes)
VERSION_ANNOTATION = "mnist-serve.io/model-version"
SHA256_ANNOTATION = "mnist-serve.io/model-sha256"
POLL_S = 1.0

Report = Callable[[str], None]


@dataclass(frozen=True)
class Place:
    """Where a Deployment is."""

    name: str
    namespace: str

    def __str__(self) -> str:
        return f"deployment/{self.name} in {self.namespace}"


def container_of(deployment):
    """The serving container of the Deployment's pod template."""
    for container in deployment.spec.template.spec.containers:
        if container.name == CONTAINER:
            return container
    raise RolloutError(
        f"deployment/{deployment.metadata.name} has no container {CONTAINER!r}: not a mnist-serve Deployment"
    )


def env_value(deployment, name: str) -> str | None:
    return next((item.value for item in container_of(deployment).env or [] if item.name == name), None)


def version_annotations(version: ModelVersion) -> dict:
    """The pod annotations that name the version a pod serves."""
    return {VERSION_ANNOTATION: version.version, SHA256_ANNOTATION: version.short_sha256}


def pin(version: ModelVersion) -> dict:
    """The pod-template patch that pins the pods to VERSION (a strategic merge: the env entry by name)."""
    return {
        "spec": {
            "template": {
                "metadata": {"annotations": version_annotations(version)},
                "spec": {
                    "containers": [{"name": CONTAINER, "env": [{"name": "MODEL_VERSION", "value": version.version}]}]
                },
            }
        }
    }


def read(apps, place: Place):
    from kubernetes.client.exceptions import ApiException

    try:
        return apps.read_namespaced_deployment(place.name, place.namespace)
    except ApiException as error:
        raise RolloutError(f"cannot read {place}: {api_error(error)}") from None


def find(apps, place: Place):
    """The Deployment, or None when there is none."""
    from kubernetes.client.exceptions import ApiException

    try:
        return apps.read_namespaced_deployment(place.name, place.namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise RolloutError(f"cannot read {place}: {api_error(error)}") from None


def selector_of(deployment, exclude_canary: bool) -> str:
    labels = deployment.spec.selector.match_labels or {}
    selector = ",".join(f"{key}={value}" for key, value in sorted(labels.items()))
    # The stable Deployment's selector also matches its canary's pods (they share the Service); TRACK tells them apart.
    return f"{selector},{TRACK}!=canary" if exclude_canary else selector


def new_pods(apps, core, deployment) -> list:
    """The pods of the Deployment's current revision (its newest ReplicaSet)."""
    namespace = deployment.metadata.namespace
    revision = (deployment.metadata.annotations or {}).get("deployment.kubernetes.io/revision")
    sets = apps.list_namespaced_replica_set(namespace, label_selector=selector_of(deployment, False)).items
    owned = [rs for rs in sets if any(ref.uid == deployment.metadata.uid for ref in rs.metadata.owner_references or [])]
    current = [
        rs for rs in owned if (rs.metadata.annotations or {}).get("deployment.kubernetes.io/revision") == revision
    ]
    if not current:
        return []
    template_hash = current[0].metadata.labels.get("pod-template-hash")
    pods = core.list_namespaced_pod(namespace, label_selector=f"pod-template-hash={template_hash}").items
    return [pod for pod in pods if pod.metadata.deletion_timestamp is None]


def pod_line(pod) -> tuple[str, str | None]:
    """A pod's state in words, and why it failed when it did (its container's termination message)."""
    status = (pod.status.container_statuses or [None])[0]
    if status is None:
        return f"{pod.status.phase.lower()}", None
    ready = "ready" if status.ready else "not ready"
    failure = None
    terminated = status.state.terminated or (status.last_state.terminated if status.last_state else None)
    if terminated and terminated.exit_code not in (0, None):
        failure = " ".join((terminated.message or terminated.reason or f"exit code {terminated.exit_code}").split())
    waiting = f", {status.state.waiting.reason}" if status.state.waiting else ""
    restarts = ""
    if status.restart_count:
        restarts = f", {status.restart_count} restart{'s' if status.restart_count != 1 else ''}"
    return f"{pod.status.phase.lower()}, {ready}{waiting}{restarts}", failure


def wait_rolled_out(apps, core, place: Place, deadline: float, report: Report) -> list:
    """Until every replica of the Deployment runs its current template and is ready; its pods. A line per pod change.
    RolloutFailed when a new pod's container fails (with its termination message) or the deadline passes."""
    seen: dict[str, str] = {}
    while True:
        deployment = read(apps, place)
        if (deployment.status.observed_generation or 0) < deployment.metadata.generation:
            time.sleep(POLL_S)  # the controller has not taken the change yet: its revision would be the last one's
            continue
        pods = new_pods(apps, core, deployment)
        for pod in pods:
            line, failure = pod_line(pod)
            if seen.get(pod.metadata.name) != line:
                seen[pod.metadata.name] = line
                report(f"  pod {pod.metadata.name}: {line}")
            if failure:
                raise RolloutFailed(f"pod {pod.metadata.name} failed: {failure}")
        status, wanted = deployment.status, deployment.spec.replicas
        counts = (status.updated_replicas, status.ready_replicas, status.available_replicas, status.replicas)
        if all((count or 0) == wanted for count in counts):
            return pods
        if time.monotonic() > deadline:
            raise RolloutFailed(
                f"not rolled out in time: {status.updated_replicas or 0} of {wanted} pods updated, "
                f"{status.ready_replicas or 0} ready"
            )
        time.sleep(POLL_S)
