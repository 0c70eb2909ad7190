"""HTTP to one pod through a port-forward: the API server carries it, so neither the Service nor the
NetworkPolicy is in the way, and the answer is that pod's own."""

from __future__ import annotations

import http.client


def pod_request(core, pod, path: str, body: bytes | None, port: int = 8080) -> tuple[int, dict[str, str], bytes]:
    """POST BODY (JSON) to PATH on PORT of the pod, or GET it when BODY is None: (status, headers, body)."""
    from kubernetes.stream import portforward

    forward = portforward(
        core.connect_get_namespaced_pod_portforward, pod.metadata.name, pod.metadata.namespace, ports=str(port)
    )
    try:
        connection = http.client.HTTPConnection("pod", port, timeout=60)
        connection.sock = forward.socket(port)
        connection.sock.settimeout(60)
        method = "POST" if body is not None else "GET"
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, {key.lower(): value for key, value in answer.getheaders()}, answer.read()
    finally:
        forward.close()
