"""The chart installed with helm on a real Kubernetes control plane: the local cluster of scripts/cluster.sh
(kube-apiserver, controller-manager and scheduler 1.36, etcd), whose kwok-simulated nodes are shaped like the
EKS node groups (k8s/kwok/nodes.yaml: two CPU nodes, and two GPU nodes with one nvidia.com/gpu each and the
GPU taint). The API server validates and stores every object, the scheduler places the pods, the
Deployment, ReplicaSet, HPA, disruption and EndpointSlice controllers do their work; only the containers
are simulated (kwok reports them Running). What needs real containers is the kind smoke test's. The cluster and an
API client on it are the fixtures of tests/kwok_cluster.py."""

from __future__ import annotations

import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helm_chart import CHART, KUBE_VERSION
from kubernetes import client, dynamic, watch
from kubernetes.client.rest import ApiException
from kubernetes.dynamic.resource import ResourceList
from kwok_cluster import one_pod_per_gpu_node_and_one_pending, scheduler_refusal

from training.config import cache_dir

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
FULLNAME = "{release}-mnist-serve"
SERVER = "app.kubernetes.io/instance={release},app.kubernetes.io/component=server"
EKS_GPU = ["--values", str(CHART / "values-eks-gpu.yaml")]
VALUES_FILES = ("values.yaml", "values-kind.yaml", "values-eks-gpu.yaml")
# What a new namespace holds before anything is installed in it.
NAMESPACE_DEFAULTS = {("ConfigMap", "kube-root-ca.crt"), ("ServiceAccount", "default")}


@pytest.fixture
def namespace(api) -> str:
    """A namespace of the test's own, holding the two Secrets values-eks-gpu.yaml names (their content does
    not matter: no container runs)."""
    core = client.CoreV1Api(api)
    name = f"chart-test-{secrets.token_hex(3)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    for secret, key in (
        ("mnist-serve-astra-bundle", "secure-connect-bundle.zip"),
        ("mnist-serve-astra-token", "token"),
    ):
        core.create_namespaced_secret(
            name, client.V1Secret(metadata=client.V1ObjectMeta(name=secret), string_data={key: "placeholder"})
        )
    yield name
    core.delete_namespace(name)


def run_helm(helm: Path, kubeconfig: Path, namespace: str, *args: str) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run(
        [str(helm), *args, f"--kubeconfig={kubeconfig}", "--namespace", namespace],
        capture_output=True,
        text=True,
        timeout=400,
    )


def install(helm, kubeconfig, namespace, release: str, *values: str) -> subprocess.CompletedProcess:  # noqa: F811
    return run_helm(helm, kubeconfig, namespace, "install", release, str(CHART), "--wait", "--timeout", "3m", *values)


def server_pods(api, namespace: str, release: str) -> list[client.V1Pod]:
    return client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=SERVER.format(release=release)).items


def wait_for_pods(
    api, namespace: str, release: str, count: int, running: int, timeout: float = 120
) -> list[client.V1Pod]:
    """The release's server pods once there are `count` of them and `running` of those are Running.
    The HPA controller sets the replica count after the install, within its 15 s sync period."""
    deadline = time.monotonic() + timeout
    while True:
        pods = server_pods(api, namespace, release)
        if len(pods) == count and sum(pod.status.phase == "Running" for pod in pods) == running:
            return pods
        assert time.monotonic() < deadline, [(pod.metadata.name, pod.status.phase, pod.spec.node_name) for pod in pods]
        time.sleep(1)


def is_ready(pod: client.V1Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())


# --- placement -------------------------------------------------------------------------------------


def test_gpu_pods_run_on_gpu_nodes_with_one_gpu_each_and_the_service_selects_them(helm, kubeconfig, api, namespace):  # noqa: F811
    done = install(helm, kubeconfig, namespace, "gpu", *EKS_GPU)
    assert done.returncode == 0, done.stderr
    assert f"kubectl --namespace {namespace} port-forward service/gpu-mnist-serve 8080:8080" in done.stdout  # NOTES.txt

    # Installed with one pod (the Deployment leaves the count to the autoscaler), raised to minReplicas (2).
    pods = wait_for_pods(api, namespace, "gpu", count=2, running=2)
    nodes = sorted(pod.spec.node_name for pod in pods)
    assert nodes == ["gpu-0", "gpu-1"], nodes  # one per zone, as topologySpreadConstraints asks
    for pod in pods:
        (container,) = pod.spec.containers
        assert container.resources.limits["nvidia.com/gpu"] == "1"
        assert container.resources.requests["nvidia.com/gpu"] == "1"

    # The Service's endpoints are exactly these pods, on the inference and metrics ports only.
    slices = (
        client.DiscoveryV1Api(api)
        .list_namespaced_endpoint_slice(namespace, label_selector="kubernetes.io/service-name=gpu-mnist-serve")
        .items
    )
    addresses = {
        address
        for s in slices
        for endpoint in s.endpoints or ()
        if endpoint.conditions.ready
        for address in endpoint.addresses
    }
    assert addresses == {pod.status.pod_ip for pod in pods} and len(addresses) == 2
    assert {port.port for s in slices for port in s.ports} == {8080, 8082}


def test_cpu_pods_stay_off_the_gpu_nodes(helm, kubeconfig, api, namespace):  # noqa: F811
    done = install(helm, kubeconfig, namespace, "cpu")
    assert done.returncode == 0, done.stderr
    pods = wait_for_pods(api, namespace, "cpu", count=2, running=2)
    assert all(pod.spec.node_name.startswith("cpu-") for pod in pods)
    assert not any("nvidia.com/gpu" in (pod.spec.containers[0].resources.limits or {}) for pod in pods)


def test_more_replicas_than_gpus_leaves_the_extra_pod_pending_for_a_gpu(helm, kubeconfig, api, namespace):  # noqa: F811
    """The autoscaler asks for 3 pods; the two GPU nodes hold one each, so the third waits for a GPU node."""
    done = install(helm, kubeconfig, namespace, "gpu", *EKS_GPU, "--set", "autoscaling.minReplicas=3")
    assert done.returncode == 0, done.stderr
    hpa = client.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler("gpu-mnist-serve", namespace)
    assert (hpa.spec.scale_target_ref.kind, hpa.spec.scale_target_ref.name) == ("Deployment", "gpu-mnist-serve")
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (3, 4)

    pods = wait_for_pods(api, namespace, "gpu", count=3, running=2)
    one_pod_per_gpu_node_and_one_pending(api, namespace, pods)


def test_a_pod_asking_for_more_gpus_than_a_node_has_is_not_scheduled(helm, kubeconfig, api, namespace):  # noqa: F811
    done = run_helm(
        helm,
        kubeconfig,
        namespace,
        "install",
        "greedy",
        str(CHART),
        "--set",
        "gpu.enabled=true",
        "--set",
        "gpu.count=2",
        "--set",
        "replicaCount=1",
    )
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 60
    while not (pods := server_pods(api, namespace, "greedy")):
        assert time.monotonic() < deadline, "no pod made"
        time.sleep(1)
    assert "Insufficient nvidia.com/gpu" in scheduler_refusal(api, namespace, pods[0])


def test_a_bad_value_is_refused_before_anything_is_created(helm, kubeconfig, api, namespace):  # noqa: F811
    done = install(helm, kubeconfig, namespace, "bad", "--set", "replicaCount=two")
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr and "at '/replicaCount'" in done.stderr
    releases = run_helm(helm, kubeconfig, namespace, "list", "--all", "--short")
    assert "bad" not in releases.stdout.split()
    assert left_in(api, namespace) == set()


# --- upgrades ------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """The server pods as the API server reported every change to them during an upgrade."""

    old_hash: str
    replicas: int
    fewest_serving: int = 10**6  # ready pods not being deleted
    most_pods: int = 0  # pods not being deleted, ready or not
    new_pods: dict[str, client.V1Pod] = field(default_factory=dict, repr=False)


def pod_template_hash(pod: client.V1Pod) -> str:
    return pod.metadata.labels["pod-template-hash"]


def upgrade_and_watch(helm, kubeconfig, api, namespace: str, release: str, *values: str) -> Rollout:  # noqa: F811
    """`helm upgrade --reuse-values VALUES`, following every pod event from before it starts until only new
    pods are left, all ready. A watch sees each change the API server stores, so no short dip is missed."""
    core = client.CoreV1Api(api)
    listed = core.list_namespaced_pod(namespace, label_selector=SERVER.format(release=release))
    pods = {pod.metadata.name: pod for pod in listed.items}
    (old_hash,) = {pod_template_hash(pod) for pod in pods.values()}
    rollout = Rollout(old_hash=old_hash, replicas=len(pods))
    upgrade = subprocess.Popen(
        [
            str(helm),
            "upgrade",
            release,
            str(CHART),
            "--reuse-values",
            *values,
            "--wait",
            "--timeout",
            "3m",
            f"--kubeconfig={kubeconfig}",
            "--namespace",
            namespace,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events = watch.Watch()
    for event in events.stream(
        core.list_namespaced_pod,
        namespace,
        label_selector=SERVER.format(release=release),
        resource_version=listed.metadata.resource_version,
        timeout_seconds=180,
    ):
        pod = event["object"]
        if event["type"] == "DELETED":
            pods.pop(pod.metadata.name, None)
        else:
            pods[pod.metadata.name] = pod
        live = [p for p in pods.values() if p.metadata.deletion_timestamp is None]
        rollout.fewest_serving = min(rollout.fewest_serving, sum(map(is_ready, live)))
        rollout.most_pods = max(rollout.most_pods, len(live))
        rollout.new_pods = {name: p for name, p in pods.items() if pod_template_hash(p) != old_hash}
        if len(pods) == len(rollout.new_pods) == rollout.replicas and all(map(is_ready, pods.values())):
            events.stop()
    _, errors = upgrade.communicate(timeout=200)
    assert upgrade.returncode == 0, errors
    assert len(rollout.new_pods) == rollout.replicas, f"the rollout did not finish: {sorted(pods)}"
    return rollout


def check_within_budgets(
    api, namespace: str, release: str, rollout: Rollout, max_surge: int, max_unavailable: int
) -> None:
    """The Deployment's update strategy and the PodDisruptionBudget (maxUnavailable 1) both held throughout."""
    budget = client.PolicyV1Api(api).read_namespaced_pod_disruption_budget(FULLNAME.format(release=release), namespace)
    assert budget.spec.max_unavailable == 1
    assert (
        rollout.fewest_serving >= rollout.replicas - max_unavailable >= rollout.replicas - budget.spec.max_unavailable
    )
    assert rollout.most_pods <= rollout.replicas + max_surge
    assert set(rollout.new_pods) == {
        pod.metadata.name for pod in server_pods(api, namespace, release)
    }  # the old ones are gone
    deadline = time.monotonic() + 30  # the disruption controller catches up with the new pods
    while (
        status := client.PolicyV1Api(api).read_namespaced_pod_disruption_budget(budget.metadata.name, namespace).status
    ).current_healthy != rollout.replicas:
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status.disruptions_allowed == 1


def env_of(pod: client.V1Pod) -> dict[str, str]:
    return {variable.name: variable.value for variable in pod.spec.containers[0].env or ()}


def test_upgrades_to_a_new_model_or_config_roll_the_gpu_pods_one_at_a_time(helm, kubeconfig, api, namespace):  # noqa: F811
    """With every GPU taken, values-eks-gpu.yaml replaces pods one at a time (maxSurge 0, maxUnavailable 1)."""
    done = install(helm, kubeconfig, namespace, "gpu", *EKS_GPU)
    assert done.returncode == 0, done.stderr
    before = wait_for_pods(api, namespace, "gpu", count=2, running=2)
    assert {env_of(pod)["MODEL_VERSION"] for pod in before} == {"production"}

    new_model = upgrade_and_watch(helm, kubeconfig, api, namespace, "gpu", "--set", "model.version=2")
    check_within_budgets(api, namespace, "gpu", new_model, max_surge=0, max_unavailable=1)
    assert {env_of(pod)["MODEL_VERSION"] for pod in new_model.new_pods.values()} == {"2"}
    assert sorted(pod.spec.node_name for pod in new_model.new_pods.values()) == ["gpu-0", "gpu-1"]

    checksum = "checksum/config"
    old_checksum = next(iter(new_model.new_pods.values())).metadata.annotations[checksum]
    new_config = upgrade_and_watch(
        helm, kubeconfig, api, namespace, "gpu", "--set", "torchserve.extraProperties.job_queue_size=2000"
    )
    check_within_budgets(api, namespace, "gpu", new_config, max_surge=0, max_unavailable=1)
    assert {pod.metadata.annotations[checksum] for pod in new_config.new_pods.values()} != {old_checksum}
    config_map = client.CoreV1Api(api).read_namespaced_config_map("gpu-mnist-serve", namespace)
    assert "job_queue_size=2000" in config_map.data["config.properties"]


def test_a_config_change_rolls_the_cpu_pods_adding_one_before_removing_one(helm, kubeconfig, api, namespace):  # noqa: F811
    """The default strategy (maxSurge 1, maxUnavailable 0): two pods serve throughout."""
    done = install(helm, kubeconfig, namespace, "cpu")
    assert done.returncode == 0, done.stderr
    wait_for_pods(api, namespace, "cpu", count=2, running=2)
    rollout = upgrade_and_watch(
        helm, kubeconfig, api, namespace, "cpu", "--set", "torchserve.extraProperties.job_queue_size=2000"
    )
    check_within_budgets(api, namespace, "cpu", rollout, max_surge=1, max_unavailable=0)
    assert rollout.fewest_serving == 2


# --- what the API server accepts ------------------------------------------------------------------


def rendered(helm, values_file: str) -> list[dict]:  # noqa: F811
    done = subprocess.run(
        [
            str(helm),
            "template",
            "dry",
            str(CHART),
            "--kube-version",
            KUBE_VERSION,
            "--values",
            str(CHART / values_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def dynamic_client(api) -> dynamic.DynamicClient:
    """A client that asks the API server which kinds it serves now. The default discovery cache is a file in /tmp
    named by the server's address, which outlives the cluster: a new cluster on the same port was asked for the
    Gateway API kinds an earlier cluster had (404)."""
    with tempfile.TemporaryDirectory() as scratch:
        return dynamic.DynamicClient(api, cache_file=f"{scratch}/discovery.json")


def dry_run(api, namespace: str, obj: dict) -> None:
    """Create `obj` with dryRun=All: the API server validates, defaults and admits it, and stores nothing."""
    resource = dynamic_client(api).resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    resource.create(body=obj, namespace=namespace, dry_run="All")


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_every_rendered_object_passes_a_server_side_dry_run(helm, api, namespace, values_file):  # noqa: F811
    objects = rendered(helm, values_file)
    for obj in objects:
        try:
            dry_run(api, namespace, obj)
        except ApiException as error:
            pytest.fail(f"{values_file}: {obj['kind']}/{obj['metadata']['name']} refused: {error.body}")
    assert {obj["kind"] for obj in objects} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "NetworkPolicy",
        "Pod",
    }
    assert left_in(api, namespace) == set()  # a dry run stores nothing


@pytest.fixture(scope="module")
def gateway_api(api) -> None:
    """The Gateway API's standard CRDs (from its Go module, GATEWAY_API_VERSION), installed once and Established."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "install-k8s-tools.sh"), "gateway-api-crds"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    extensions = client.ApiextensionsV1Api(api)
    names = []
    for path in sorted((cache_dir() / "bin" / "gateway-api-crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if crd and crd["kind"] == "CustomResourceDefinition":
                names.append(crd["metadata"]["name"])
                try:
                    extensions.create_custom_resource_definition(crd)
                except ApiException as error:
                    assert error.status == 409, error.body  # installed by an earlier run on this cluster
    deadline = time.monotonic() + 60
    while not all(
        any(
            c.type == "Established" and c.status == "True"
            for c in extensions.read_custom_resource_definition(name).status.conditions or []
        )
        for name in names
    ):
        assert time.monotonic() < deadline, "the Gateway API CRDs were not Established within 60 s"
        time.sleep(1)


def test_the_canary_the_gateway_api_route_and_the_rollout_rbac_pass_a_server_side_dry_run(
    helm, api, namespace, gateway_api
):  # noqa: F811
    done = subprocess.run(
        [
            str(helm),
            "template",
            "dry",
            str(CHART),
            "--kube-version",
            KUBE_VERSION,
            "--set",
            "canary.enabled=true",
            "--set",
            "canary.version=1",
            "--set",
            "canary.replicas=1",
            "--set",
            "gatewayAPI.enabled=true",
            "--set",
            "gatewayAPI.parentRefs[0].name=public",
            "--set",
            "gatewayAPI.canaryWeight=25",
            "--set",
            "rollout.rbac.create=true",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    objects = [obj for obj in yaml.safe_load_all(done.stdout) if obj]
    for obj in objects:
        try:
            dry_run(api, namespace, obj)
        except ApiException as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} refused: {error.body}")
    kinds = [(obj["kind"], obj["metadata"]["name"]) for obj in objects]
    assert {
        ("HTTPRoute", "dry-mnist-serve"),
        ("Deployment", "dry-mnist-serve-canary"),
        ("Service", "dry-mnist-serve-stable"),
        ("Service", "dry-mnist-serve-canary"),
        ("Role", "dry-mnist-serve-rollout"),
        ("RoleBinding", "dry-mnist-serve-rollout"),
    } <= set(kinds)
    route = next(obj for obj in objects if obj["kind"] == "HTTPRoute")
    assert [ref["weight"] for ref in route["spec"]["rules"][0]["backendRefs"]] == [75, 25]
    # The check can fail: the CRD's own schema refuses a weight over its maximum.
    route["spec"]["rules"][0]["backendRefs"][0]["weight"] = 1_000_001
    with pytest.raises(ApiException) as refused:
        dry_run(api, namespace, route)
    assert refused.value.status == 422 and "weight" in refused.value.body


def test_the_dry_run_refuses_what_a_schema_cannot_see(helm, api, namespace):  # noqa: F811
    """The check above can fail: a GPU limit without the same request passes the OpenAPI schema, but not the
    API server's validation (extended resources cannot be overcommitted)."""
    deployment = next(obj for obj in rendered(helm, "values-eks-gpu.yaml") if obj["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = "2"
    with pytest.raises(ApiException) as refused:
        dry_run(api, namespace, deployment)
    assert refused.value.status == 422 and "nvidia.com/gpu" in refused.value.body


# --- helm test and uninstall ---------------------------------------------------------------------


def left_in(api, namespace: str) -> set[tuple[str, str]]:
    """(kind, name) of every object in the namespace, of every namespaced kind the API server lists, except
    what every namespace holds, the test's Secrets, and events."""
    found = set()
    for resource in dynamic_client(api).resources.search(namespaced=True):
        if (
            isinstance(resource, ResourceList)
            or "/" in resource.name
            or "list" not in (resource.verbs or ())
            or resource.kind == "Event"
            or not resource.preferred
        ):
            continue
        for item in resource.get(namespace=namespace).items:
            found.add((resource.kind, item.metadata.name))
    return found - NAMESPACE_DEFAULTS - {("Secret", "mnist-serve-astra-bundle"), ("Secret", "mnist-serve-astra-token")}


def test_helm_test_creates_its_pod_and_uninstall_leaves_only_that_pod(helm, kubeconfig, api, namespace):  # noqa: F811
    done = install(helm, kubeconfig, namespace, "gpu", *EKS_GPU)
    assert done.returncode == 0, done.stderr
    assert ("Deployment", "gpu-mnist-serve") in left_in(api, namespace)

    # No container runs here, so the test pod never finishes and helm test times out; the pod it created is
    # checked instead (the kind smoke test runs it for real).
    tested = run_helm(helm, kubeconfig, namespace, "test", "gpu", "--timeout", "15s")
    assert tested.returncode != 0 and "timed out" in tested.stderr
    pod = client.CoreV1Api(api).read_namespaced_pod("gpu-mnist-serve-test", namespace)
    assert pod.metadata.annotations["helm.sh/hook"] == "test"
    assert env_of(pod)["PREDICT_URL"] == "http://gpu-mnist-serve:8080/predictions/mnist"
    assert pod.spec.volumes[0].config_map.name == "gpu-mnist-serve-test"
    assert pod.status.phase == "Running" and pod.spec.node_name.startswith("gpu-")  # with the serving image's node

    uninstalled = run_helm(helm, kubeconfig, namespace, "uninstall", "gpu", "--wait", "--timeout", "2m")
    assert uninstalled.returncode == 0, uninstalled.stderr
    # Helm never deletes hooks; the test pod stays for its logs, and NOTES.txt says how to remove it.
    wait_until_left(api, namespace, {("Pod", "gpu-mnist-serve-test")})
    client.CoreV1Api(api).delete_namespaced_pod("gpu-mnist-serve-test", namespace, grace_period_seconds=0)


def test_uninstall_without_a_test_run_leaves_nothing(helm, kubeconfig, api, namespace):  # noqa: F811
    for release, values in (("gpu", EKS_GPU), ("cpu", [])):
        done = install(helm, kubeconfig, namespace, release, *values)
        assert done.returncode == 0, done.stderr
    wait_for_pods(api, namespace, "gpu", count=2, running=2)
    assert len(left_in(api, namespace)) > 20  # two releases' objects, ReplicaSets, pods, EndpointSlices, helm's Secrets
    for release in ("gpu", "cpu"):
        uninstalled = run_helm(helm, kubeconfig, namespace, "uninstall", release, "--wait", "--timeout", "2m")
        assert uninstalled.returncode == 0, uninstalled.stderr
    wait_until_left(api, namespace, set())


def wait_until_left(api, namespace: str, expected: set[tuple[str, str]], timeout: float = 60) -> None:
    """The garbage collector removes ReplicaSets and pods shortly after their Deployment."""
    deadline = time.monotonic() + timeout
    while (left := left_in(api, namespace)) != expected:
        assert time.monotonic() < deadline, left - expected
        time.sleep(1)
