"""Talking to the cluster: the credentials, the namespace when none is given, and an API error in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

from registry.rollout.errors import RolloutError


def clients():
    """(AppsV1Api, CoreV1Api): in-cluster credentials in a pod (a CI runner's ServiceAccount), else the kubeconfig."""
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
