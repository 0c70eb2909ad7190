"""A Deployment rolled onto a registry version and checked pod by pod; `promote --deployment` moves an alias with it
and puts both back when the new version fails."""

from __future__ import annotations

import time

from registry.rollout.check import check_pod
from registry.rollout.deployment import Place, Report, env_value, pin, read, wait_rolled_out
from registry.rollout.errors import RolloutError, RolloutFailed
from registry.rollout.kube import api_error, clients
from registry.store import ModelVersion, Registry, RegistryError


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
    report(
        f"{place}: {len(pods)} pod{'s' if len(pods) != 1 else ''} on version {version.version} "
        f"in {time.monotonic() - began:.0f} s"
    )


def serving_version(registry: Registry, deployment) -> ModelVersion | None:
    """The version the Deployment's pods serve now: what its MODEL_VERSION names (a version or an alias)."""
    if env_value(deployment, "MODEL_SOURCE") == "image":
        raise RolloutError(
            f"deployment/{deployment.metadata.name} serves the model built into its image "
            "(MODEL_SOURCE=image); install the chart with model.source=registry to roll out "
            "registry versions"
        )
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
            raise RolloutError(
                f"version {version.version} failed: {failure}; alias {alias} is back on "
                f"{before or 'nothing'}, but {place} served no registry version before, "
                "so it was left as it is"
            ) from None
        try:
            roll(apps, core, place, previous, timeout, report, check=False)
        except RolloutFailed as again:
            raise RolloutError(
                f"version {version.version} failed ({failure}); alias {alias} is back on "
                f"{before or 'nothing'}, but rolling {place} back to version {previous.version} "
                f"failed too: {again}"
            ) from None
        raise RolloutError(
            f"version {version.version} failed ({failure}); rolled back: {place} and alias {alias} "
            f"are on version {previous.version} again"
        ) from None


def undo_alias(registry: Registry, alias: str, before: str | None) -> None:
    if before is None:
        registry.drop_alias(alias)
    else:
        registry.promote(before, alias)
