"""The canary: NAME-canary, a copy of NAME's pods on another version behind the same Service, started and
checked like a rollout, then promoted (the stable Deployment rolled to its version) or aborted."""

from __future__ import annotations

import time

from registry.rollout.check import check_pod
from registry.rollout.deployment import (
    CONTAINER,
    POLL_S,
    TRACK,
    Place,
    Report,
    env_value,
    find,
    read,
    selector_of,
    version_annotations,
    wait_rolled_out,
)
from registry.rollout.errors import RolloutError, RolloutFailed
from registry.rollout.kube import api_error, clients
from registry.rollout.roll import promote, serving_version
from registry.store import ModelVersion, Registry


def canary_place(place: Place) -> Place:
    return Place(f"{place.name}-canary", place.namespace)


def canary_spec(stable, version: ModelVersion, replicas: int) -> dict:
    """NAME-canary: the stable Deployment's pods on VERSION, told apart by TRACK=canary, REPLICAS of them."""
    from kubernetes import client

    body = client.ApiClient().sanitize_for_serialization(stable)
    spec = body["spec"]
    name = f"{stable.metadata.name}-canary"
    labels = {key: value for key, value in (body["metadata"].get("labels") or {}).items()}
    spec["replicas"] = replicas
    spec["selector"]["matchLabels"][TRACK] = "canary"
    spec["template"]["metadata"].setdefault("labels", {})[TRACK] = "canary"
    spec["template"]["metadata"]["annotations"] = {
        **(spec["template"]["metadata"].get("annotations") or {}),
        **version_annotations(version),
    }
    for container in spec["template"]["spec"]["containers"]:
        if container["name"] == CONTAINER:
            container["env"] = [item for item in container.get("env", []) if item["name"] != "MODEL_VERSION"] + [
                {"name": "MODEL_VERSION", "value": version.version}
            ]
    spec.pop("revisionHistoryLimit", None)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "spec": spec,
        "metadata": {"name": name, "namespace": stable.metadata.namespace, "labels": {**labels, TRACK: "canary"}},
    }


def canary_start(
    registry: Registry, name: str, place: Place, replicas: int, timeout: float, report: Report
) -> ModelVersion:
    """A canary of a version beside the Deployment, checked like a rollout; removed again when it fails."""
    from kubernetes.client.exceptions import ApiException

    apps, core = clients()
    version = registry.get(name)
    stable = read(apps, place)
    serving_version(registry, stable)  # refuses a Deployment that serves its image's model
    canary = canary_place(place)
    # A canary neither promoted nor aborted would be in the way of the new one.
    delete_canary(apps, core, canary, time.monotonic() + timeout, lambda line: None)
    try:
        apps.create_namespaced_deployment(place.namespace, canary_spec(stable, version, replicas))
    except ApiException as error:
        raise RolloutError(f"cannot create {canary}: {api_error(error)}") from None
    report(
        f"canary: {canary}, {replicas} pod{'s' if replicas != 1 else ''} of version {version.version} beside "
        f"{stable.spec.replicas} of {place.name}"
    )
    began = time.monotonic()
    try:
        for pod in wait_rolled_out(apps, core, canary, began + timeout, report):
            report(f"  pod {pod.metadata.name}: {check_pod(core, pod, version)}")
    except RolloutFailed as failure:
        delete_canary(apps, core, canary, time.monotonic() + timeout, report)
        raise RolloutError(
            f"canary of version {version.version} failed ({failure}); removed, {place} is unchanged"
        ) from None
    report(
        f"canary: ready in {time.monotonic() - began:.0f} s; the Service now sends it about "
        f"{replicas / (replicas + stable.spec.replicas):.0%} of the requests (its share of the pods)"
    )
    return version


def delete_canary(apps, core, canary: Place, deadline: float, report: Report) -> bool:
    """Delete NAME-canary and wait until its pods are gone; False when there was none."""
    deployment = find(apps, canary)
    if deployment is None:
        return False
    selector = selector_of(deployment, False)
    apps.delete_namespaced_deployment(canary.name, canary.namespace, propagation_policy="Foreground")
    while core.list_namespaced_pod(canary.namespace, label_selector=selector).items:
        if time.monotonic() > deadline:
            raise RolloutError(f"the pods of {canary} are still there after its deletion")
        time.sleep(POLL_S)
    report(f"canary: {canary} removed")
    return True


def canary_abort(place: Place, timeout: float, report: Report) -> None:
    apps, core = clients()
    if not delete_canary(apps, core, canary_place(place), time.monotonic() + timeout, report):
        raise RolloutError(f"there is no {canary_place(place)} to abort")


def canary_promote(registry: Registry, alias: str, place: Place, timeout: float, report: Report) -> ModelVersion:
    """Roll the stable Deployment to the canary's version (checked, undone on failure), then remove the canary."""
    apps, core = clients()
    canary = canary_place(place)
    deployment = find(apps, canary)
    if deployment is None:
        raise RolloutError(f"there is no {canary} to promote")
    version = promote(registry, env_value(deployment, "MODEL_VERSION"), alias, place, timeout, report)
    delete_canary(apps, core, canary, time.monotonic() + timeout, report)
    return version
