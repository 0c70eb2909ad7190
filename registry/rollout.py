"""A registry version onto the serving pods of a Kubernetes cluster, checked, and taken back when it fails:
`mnist-registry promote --rollout` and `mnist-registry canary`, on plain Kubernetes (the `kubernetes` client).

A rollout pins the Deployment's pods to one version (MODEL_VERSION in the pod template, so a pod that restarts
later never picks up a newer alias target), follows the new pods one line at a time, then asks every new pod
for real test digits through a port-forward (the NetworkPolicy does not apply inside the pod): each answer must
name the version and archive checksum, and the accuracy must reach the version's own test accuracy less a
margin. A pod that fails to start (its termination message says why), a deadline passed, or a failed check puts
the Deployment and the alias back where they were, and the command fails in one line.

A canary is a second Deployment, NAME-canary, a copy of NAME's pods on another version behind the same Service;
traffic splits by replica count (no per-request weights without a mesh or a Gateway API route)."""
from __future__ import annotations

import http.client
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from registry.store import ModelVersion, Registry, RegistryError

CONTAINER = "torchserve"  # the chart's serving container
TRACK = "mnist-serve.io/track"  # stable or canary, on the pods (the chart's and those this module makes)
VERSION_ANNOTATION = "mnist-serve.io/model-version"
SHA256_ANNOTATION = "mnist-serve.io/model-sha256"
CHECK_DIGITS = Path(__file__).with_name("check-digits.npz")  # the first 100 MNIST test digits and their labels
PER_REQUEST = 50  # instances per check request (the handler takes up to 64)
ACCURACY_MARGIN = 0.02  # below the version's recorded test accuracy (99.5 % -> 97.5 % on 100 digits)
DEFAULT_ACCURACY = 0.9  # for a version published without a test accuracy
POLL_S = 1.0

Report = Callable[[str], None]


class RolloutError(RegistryError):
    """The rollout could not be done, or was undone; the message is one line saying why and where things are."""


class RolloutFailed(Exception):
    """The new version failed on the cluster (a pod, the deadline or the check); the rollout is undone."""


@dataclass(frozen=True)
class Place:
    """Where a Deployment is."""
    name: str
    namespace: str

    def __str__(self) -> str:
        return f"deployment/{self.name} in {self.namespace}"


def clients():
    """(AppsV1Api, CoreV1Api): in-cluster credentials in a pod (a CI runner's ServiceAccount), else the kubeconfig."""
    import os

    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        try:
            config.load_kube_config()
        except config.ConfigException as error:
            raise RolloutError(f"no Kubernetes credentials: {error} (set KUBECONFIG or run in a pod)") from None
    return client.AppsV1Api(), client.CoreV1Api()


def default_namespace() -> str:
    """The kubeconfig context's namespace, or the pod's own when in a cluster; else default."""
    import os

    in_pod = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if os.environ.get("KUBERNETES_SERVICE_HOST") and in_pod.exists():
        return in_pod.read_text().strip()
    from kubernetes import config

    try:
        _, current = config.list_kube_config_contexts()
    except (config.ConfigException, OSError):
        return "default"
    return current.get("context", {}).get("namespace") or "default"


def api_error(error) -> str:
    """One line for a Kubernetes API error."""
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{error.status} {error.reason}"


# --- the Deployment ------------------------------------------------------------------------------------

def container_of(deployment) -> dict:
    for container in deployment.spec.template.spec.containers:
        if container.name == CONTAINER:
            return container
    raise RolloutError(f"deployment/{deployment.metadata.name} has no container {CONTAINER!r}: not a mnist-serve Deployment")


def env_value(deployment, name: str) -> str | None:
    return next((item.value for item in container_of(deployment).env or [] if item.name == name), None)


def pin(version: ModelVersion) -> dict:
    """The pod-template patch that pins the pods to VERSION (a strategic merge: the env entry by name)."""
    return {"spec": {"template": {
        "metadata": {"annotations": {VERSION_ANNOTATION: version.version, SHA256_ANNOTATION: version.sha256[:12]}},
        "spec": {"containers": [{"name": CONTAINER, "env": [{"name": "MODEL_VERSION", "value": version.version}]}]},
    }}}


def read(apps, place: Place):
    from kubernetes.client.exceptions import ApiException

    try:
        return apps.read_namespaced_deployment(place.name, place.namespace)
    except ApiException as error:
        raise RolloutError(f"cannot read {place}: {api_error(error)}") from None


def selector_of(deployment, exclude_canary: bool) -> str:
    labels = deployment.spec.selector.match_labels or {}
    selector = ",".join(f"{key}={value}" for key, value in sorted(labels.items()))
    # The stable Deployment's selector also matches its canary's pods (they share the Service); they are told apart by TRACK.
    return f"{selector},{TRACK}!=canary" if exclude_canary else selector


def new_pods(apps, core, deployment) -> list:
    """The pods of the Deployment's current revision (its newest ReplicaSet)."""
    revision = (deployment.metadata.annotations or {}).get("deployment.kubernetes.io/revision")
    sets = apps.list_namespaced_replica_set(deployment.metadata.namespace, label_selector=selector_of(deployment, False)).items
    owned = [rs for rs in sets if any(ref.uid == deployment.metadata.uid for ref in rs.metadata.owner_references or [])]
    current = [rs for rs in owned if (rs.metadata.annotations or {}).get("deployment.kubernetes.io/revision") == revision]
    if not current:
        return []
    template_hash = current[0].metadata.labels.get("pod-template-hash")
    pods = core.list_namespaced_pod(deployment.metadata.namespace, label_selector=f"pod-template-hash={template_hash}").items
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
    restarts = f", {status.restart_count} restart{'s' if status.restart_count != 1 else ''}" if status.restart_count else ""
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
        if all((count or 0) == wanted for count in (status.updated_replicas, status.ready_replicas, status.available_replicas, status.replicas)):
            return pods
        if time.monotonic() > deadline:
            raise RolloutFailed(f"not rolled out in time: {status.updated_replicas or 0} of {wanted} pods updated, "
                                f"{status.ready_replicas or 0} ready")
        time.sleep(POLL_S)


# --- the check of real predictions -----------------------------------------------------------------------

def check_digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(CHECK_DIGITS) as data:
        return data["images"], data["labels"]


def post(core, pod, path: str, body: bytes | None, port: int = 8080) -> tuple[int, dict[str, str], bytes]:
    """An HTTP request to PORT of the pod through a port-forward: (status, headers, body)."""
    from kubernetes.stream import portforward

    forward = portforward(core.connect_get_namespaced_pod_portforward, pod.metadata.name, pod.metadata.namespace, ports=str(port))
    try:
        connection = http.client.HTTPConnection("pod", port, timeout=60)
        connection.sock = forward.socket(port)
        connection.sock.settimeout(60)
        connection.request("POST" if body is not None else "GET", path, body=body, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, {key.lower(): value for key, value in answer.getheaders()}, answer.read()
    finally:
        forward.close()


def check_pod(core, pod, version: ModelVersion) -> str:
    """Real test digits through one pod: each answer must name VERSION and its checksum; returns the accuracy line.
    RolloutFailed when an answer is an error, has another shape or version, or accuracy is below the version's own."""
    images, labels = check_digits()
    minimum = (version.test_accuracy - ACCURACY_MARGIN) if version.test_accuracy is not None else DEFAULT_ACCURACY
    read_right = 0
    for start in range(0, len(images), PER_REQUEST):
        chunk = images[start:start + PER_REQUEST]
        body = json.dumps({"instances": chunk.tolist()}).encode()
        try:
            status, headers, answer = post(core, pod, "/predictions/mnist", body)
        except (OSError, http.client.HTTPException) as error:
            raise RolloutFailed(f"pod {pod.metadata.name} did not answer: {error}") from None
        if status != 200:
            raise RolloutFailed(f"pod {pod.metadata.name} answered {status}: {answer[:200].decode(errors='replace')}")
        try:
            parsed = json.loads(answer)
            digits = [int(item["digit"]) for item in parsed["predictions"]]
            served = parsed["model"]
        except (ValueError, KeyError, TypeError):
            raise RolloutFailed(f"pod {pod.metadata.name} answered in another shape: {answer[:200].decode(errors='replace')}") from None
        if len(digits) != len(chunk):
            raise RolloutFailed(f"pod {pod.metadata.name} answered {len(digits)} predictions for {len(chunk)} images")
        said = (served.get("version"), served.get("sha256"), headers.get("x-model-version"))
        if said != (version.version, version.sha256[:12], version.version):
            raise RolloutFailed(f"pod {pod.metadata.name} serves version {said[0]} (sha256 {said[1]}), not {version.version}")
        read_right += int(np.sum(np.array(digits) == labels[start:start + PER_REQUEST]))
    accuracy = read_right / len(images)
    if accuracy < minimum:
        raise RolloutFailed(f"pod {pod.metadata.name} read {accuracy:.0%} of {len(images)} test digits right, "
                            f"below {minimum:.1%} (the version's test accuracy less {ACCURACY_MARGIN:.0%})")
    return f"{read_right}/{len(images)} test digits right, version {version.version} sha256 {version.sha256[:12]}"


def roll(apps, core, place: Place, version: ModelVersion, timeout: float, report: Report, check: bool = True) -> None:
    """Pin the Deployment's pods to VERSION, follow the rollout, check every new pod."""
    from kubernetes.client.exceptions import ApiException

    began = time.monotonic()
    try:
        apps.patch_namespaced_deployment(place.name, place.namespace, pin(version))
    except ApiException as error:
        raise RolloutError(f"cannot change {place}: {api_error(error)}") from None
    pods = wait_rolled_out(apps, core, place, began + timeout, report)
    if check:
        for pod in pods:
            report(f"  pod {pod.metadata.name}: {check_pod(core, pod, version)}")
    report(f"{place}: {len(pods)} pod{'s' if len(pods) != 1 else ''} on version {version.version} in {time.monotonic() - began:.0f} s")


# --- the commands ------------------------------------------------------------------------------------------

def serving_version(registry: Registry, deployment) -> ModelVersion | None:
    """The version the Deployment's pods serve now: what its MODEL_VERSION names (a version or an alias)."""
    if env_value(deployment, "MODEL_SOURCE") == "image":
        raise RolloutError(f"deployment/{deployment.metadata.name} serves the model built into its image (MODEL_SOURCE=image); "
                           "install the chart with model.source=registry to roll out registry versions")
    pinned = env_value(deployment, "MODEL_VERSION") or "production"
    try:
        return registry.get(pinned)
    except RegistryError:
        return None


def promote(registry: Registry, name: str, alias: str, place: Place, timeout: float, report: Report) -> ModelVersion:
    """Point ALIAS at a version and roll the Deployment to it; on failure both go back and RolloutError says why."""
    apps, core = clients()
    version = registry.get(name)
    previous = serving_version(registry, read(apps, place))
    before = registry.aliases().get(alias)
    registry.promote(version.version, alias)
    report(f"{alias} -> version {version.version}; rolling {place} to it")
    try:
        roll(apps, core, place, version, timeout, report)
        return version
    except RolloutFailed as failure:
        report(f"version {version.version} failed: {failure}; rolling back")
        undo_alias(registry, alias, before)
        if previous is None:
            raise RolloutError(f"version {version.version} failed: {failure}; alias {alias} is back on {before or 'nothing'}, "
                               f"but {place} served no registry version before, so it was left as it is") from None
        try:
            roll(apps, core, place, previous, timeout, report, check=False)
        except RolloutFailed as again:
            raise RolloutError(f"version {version.version} failed ({failure}); alias {alias} is back on {before or 'nothing'}, "
                               f"but rolling {place} back to version {previous.version} failed too: {again}") from None
        raise RolloutError(f"version {version.version} failed ({failure}); rolled back: {place} and alias {alias} are on "
                           f"version {previous.version} again") from None


def undo_alias(registry: Registry, alias: str, before: str | None) -> None:
    if before is None:
        registry.drop_alias(alias)
    else:
        registry.promote(before, alias)


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
    spec["template"]["metadata"]["annotations"] = {**(spec["template"]["metadata"].get("annotations") or {}),
                                                  VERSION_ANNOTATION: version.version, SHA256_ANNOTATION: version.sha256[:12]}
    for container in spec["template"]["spec"]["containers"]:
        if container["name"] == CONTAINER:
            container["env"] = [item for item in container.get("env", []) if item["name"] != "MODEL_VERSION"] + \
                [{"name": "MODEL_VERSION", "value": version.version}]
    spec.pop("revisionHistoryLimit", None)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "spec": spec,
            "metadata": {"name": name, "namespace": stable.metadata.namespace, "labels": {**labels, TRACK: "canary"}}}


def canary_start(registry: Registry, name: str, place: Place, replicas: int, timeout: float, report: Report) -> ModelVersion:
    """A canary of a version beside the Deployment, checked like a rollout; removed again when it fails."""
    from kubernetes.client.exceptions import ApiException

    apps, core = clients()
    version = registry.get(name)
    stable = read(apps, place)
    serving_version(registry, stable)  # refuses a Deployment that serves its image's model
    canary = canary_place(place)
    delete_canary(apps, core, canary, time.monotonic() + timeout, lambda line: None)  # one left from before
    try:
        apps.create_namespaced_deployment(place.namespace, canary_spec(stable, version, replicas))
    except ApiException as error:
        raise RolloutError(f"cannot create {canary}: {api_error(error)}") from None
    report(f"canary: {canary}, {replicas} pod{'s' if replicas != 1 else ''} of version {version.version} beside "
           f"{stable.spec.replicas} of {place.name}")
    began = time.monotonic()
    try:
        for pod in wait_rolled_out(apps, core, canary, began + timeout, report):
            report(f"  pod {pod.metadata.name}: {check_pod(core, pod, version)}")
    except RolloutFailed as failure:
        delete_canary(apps, core, canary, time.monotonic() + timeout, report)
        raise RolloutError(f"canary of version {version.version} failed ({failure}); removed, {place} is unchanged") from None
    report(f"canary: ready in {time.monotonic() - began:.0f} s; the Service now sends it about "
           f"{replicas / (replicas + stable.spec.replicas):.0%} of the requests (its share of the pods)")
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


def find(apps, place: Place):
    """The Deployment, or None when there is none."""
    from kubernetes.client.exceptions import ApiException

    try:
        return apps.read_namespaced_deployment(place.name, place.namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise RolloutError(f"cannot read {place}: {api_error(error)}") from None


def answers_per_version(apps, core, place: Place) -> dict[str, tuple[int, int]]:
    """version -> (ready pods, requests they answered) over the Deployment's pods and its canary's, from each pod's
    own Prometheus counter (ts_inference_requests_total) and the version its pod template pins."""
    counts: dict[str, tuple[int, int]] = {}
    canary = find(apps, canary_place(place))
    for deployment, exclude_canary in [(read(apps, place), True)] + ([(canary, False)] if canary else []):
        version = env_value(deployment, "MODEL_VERSION") or "?"
        for pod in core.list_namespaced_pod(place.namespace, label_selector=selector_of(deployment, exclude_canary)).items:
            if not any(status.ready for status in pod.status.container_statuses or []):
                continue
            _, _, text = post(core, pod, "/metrics", None, port=8082)
            answered = sum(float(v) for v in re.findall(r"^ts_inference_requests_total\{[^}]*\} (\S+)$", text.decode(), re.MULTILINE))
            pods, total = counts.get(version, (0, 0))
            counts[version] = (pods + 1, total + int(answered))
    return counts


def canary_status(place: Place, report: Report) -> None:
    apps, core = clients()
    counts = answers_per_version(apps, core, place)
    total = sum(answered for _, answered in counts.values()) or 1
    pods_total = sum(pods for pods, _ in counts.values()) or 1
    for version, (pods, answered) in sorted(counts.items()):
        report(f"version {version}: {pods} pod{'s' if pods != 1 else ''} ({pods / pods_total:.0%} of the pods), "
               f"{answered:,} requests answered since they started ({answered / total:.0%})")

