"""Which version answers how much: each ready pod's own request counter, summed per version it is pinned to,
over the Deployment and its canary (`canary status`)."""

from __future__ import annotations

import re

from registry.rollout.canary import canary_place
from registry.rollout.deployment import Place, Report, env_value, find, read, selector_of
from registry.rollout.kube import clients
from registry.rollout.pod_http import pod_request


def answers_per_version(apps, core, place: Place) -> dict[str, tuple[int, int]]:
    """version -> (ready pods, requests they answered) over the Deployment's pods and its canary's, from each pod's
    own Prometheus counter (ts_inference_requests_total) and the version its pod template pins."""
    counts: dict[str, tuple[int, int]] = {}
    canary = find(apps, canary_place(place))
    for deployment, exclude_canary in [(read(apps, place), True)] + ([(canary, False)] if canary else []):
        version = env_value(deployment, "MODEL_VERSION") or "?"
        selector = selector_of(deployment, exclude_canary)
        for pod in core.list_namespaced_pod(place.namespace, label_selector=selector).items:
            if not any(status.ready for status in pod.status.container_statuses or []):
                continue
            _, _, text = pod_request(core, pod, "/metrics", None, port=8082)
            counters = re.findall(r"^ts_inference_requests_total\{[^}]*\} (\S+)$", text.decode(), re.MULTILINE)
            answered = sum(float(value) for value in counters)
            pods, total = counts.get(version, (0, 0))
            counts[version] = (pods + 1, total + int(answered))
    return counts


def canary_status(place: Place, report: Report) -> None:
    apps, core = clients()
    counts = answers_per_version(apps, core, place)
    total = sum(answered for _, answered in counts.values()) or 1
    pods_total = sum(pods for pods, _ in counts.values()) or 1
    for version, (pods, answered) in sorted(counts.items()):
        report(
            f"version {version}: {pods} pod{'s' if pods != 1 else ''} ({pods / pods_total:.0%} of the pods), "
            f"{answered:,} requests answered since they started ({answered / total:.0%})"
        )
