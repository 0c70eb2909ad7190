"""The training chart installed with helm on the local control plane of scripts/cluster.sh (fixtures of
tests/kwok_cluster.py), whose simulated nodes are shaped like the EKS node groups: two CPU nodes, and two GPU nodes
with one nvidia.com/gpu each and the GPU taint. The Job controller, the scheduler and the EndpointSlice controller
are real; the containers are not. kwok plays kubelet, and ends a Job's pods as Succeeded the moment they run, which
would free their GPUs at once: an admission policy (a built-in ValidatingAdmissionPolicy, in this module's
namespaces only) keeps them running until a test ends them itself, with the exit code and message a rank would
leave. What needs real containers (torchrun, gloo) is the kind smoke test's and tests of the training code."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from helm_chart import TRAIN_CHART
from kubernetes import client
from kubernetes.client.rest import ApiException
from kwok_cluster import one_pod_per_gpu_node_and_one_pending

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
EKS_GPU = ["--values", str(TRAIN_CHART / "values-eks-gpu.yaml")]
# Namespaces with this label hold Job pods that only a test ends (the policy below).
HELD = {"mnist-serve.io/test-ends-job-pods": "true"}
POLICY = "mnist-train-test-job-pods-end-with-a-message"
JOB_NAME = "batch.kubernetes.io/job-name"
INDEX = "batch.kubernetes.io/job-completion-index"


@pytest.fixture(scope="module")
def pods_end_when_told(api):
    """A ValidatingAdmissionPolicy that refuses a pod's status update to Succeeded without a termination message,
    in the HELD namespaces. kwok's own completion has none, so it is refused; a test's, with a rank's message, is
    not. Removed at the end."""
    admission = client.AdmissionregistrationV1Api(api)
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": POLICY},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["pods/status"]}
                ]
            },
            "validations": [
                {
                    "expression": "object.status.phase != 'Succeeded' || (has(object.status.containerStatuses) && "
                    "object.status.containerStatuses.exists(c, has(c.state.terminated) && "
                    "has(c.state.terminated.message) && c.state.terminated.message != ''))",
                    "message": "a simulated rank ends only as a test says",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": POLICY},
        "spec": {
            "policyName": POLICY,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": HELD}},
        },
    }
    for create, body in (
        (admission.create_validating_admission_policy, policy),
        (admission.create_validating_admission_policy_binding, binding),
    ):
        try:
            create(body)
        except ApiException as error:
            assert error.status == 409, error.body  # left by a run that was killed
    yield
    admission.delete_validating_admission_policy_binding(POLICY)
    admission.delete_validating_admission_policy(POLICY)


@pytest.fixture
def namespace(api, pods_end_when_told) -> str:
    """A namespace of the test's own, with the Secrets values-eks-gpu.yaml names (no container reads them), in
    which the policy holds the Job's pods; checked to be in force before the test starts."""
    core = client.CoreV1Api(api)
    name = f"train-test-{secrets.token_hex(3)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=HELD)))
    for secret, key in (
        ("mnist-serve-astra-bundle", "secure-connect-bundle.zip"),
        ("mnist-train-astra-token", "token"),
    ):
        core.create_namespaced_secret(
            name, client.V1Secret(metadata=client.V1ObjectMeta(name=secret), string_data={key: "placeholder"})
        )
    wait_until_the_policy_holds(core, name)
    yield name
    # Its pods hold GPUs until they are gone, and a Job's pod goes only once it has ended: end them all.
    for pod in core.list_namespaced_pod(name).items:
        if pod.status.phase not in ("Succeeded", "Failed"):
            end_rank(api, name, pod, 143, "stopped at the end of the test")
    core.delete_namespace(name)
    deadline = time.monotonic() + 60
    while pods := core.list_namespaced_pod(name).items:
        assert time.monotonic() < deadline, [
            (pod.metadata.name, pod.status.phase, pod.metadata.finalizers, pod.metadata.deletion_timestamp)
            for pod in pods
        ]
        time.sleep(1)


def wait_until_the_policy_holds(core: client.CoreV1Api, namespace: str) -> None:
    """The API server applies a new policy within a few seconds: until it refuses a bare Succeeded, try again."""
    probe = client.V1Pod(
        metadata=client.V1ObjectMeta(name="policy-probe"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="none")], node_name="cpu-0"),
    )
    core.create_namespaced_pod(namespace, probe)
    deadline = time.monotonic() + 60
    while True:
        try:
            core.patch_namespaced_pod_status("policy-probe", namespace, {"status": {"phase": "Succeeded"}})
        except ApiException as error:
            assert "a simulated rank ends only as a test says" in error.body, error.body
            break
        assert time.monotonic() < deadline, "the admission policy was not in force within 60 s"
        core.delete_namespaced_pod("policy-probe", namespace, grace_period_seconds=0)
        while core.list_namespaced_pod(namespace, field_selector="metadata.name=policy-probe").items:
            time.sleep(0.5)
        core.create_namespaced_pod(namespace, probe)
        time.sleep(1)
    core.delete_namespaced_pod("policy-probe", namespace, grace_period_seconds=0)


def helm_install(helm, kubeconfig, namespace, release: str, *values: str) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run(
        [
            str(helm),
            "install",
            release,
            str(TRAIN_CHART),
            *values,
            f"--kubeconfig={kubeconfig}",
            "--namespace",
            namespace,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def job_pods(api, namespace: str, job: str) -> list[client.V1Pod]:
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"{JOB_NAME}={job}").items
    return sorted(pods, key=lambda pod: int(pod.metadata.labels[INDEX]))


def wait_for_pods(api, namespace: str, job: str, count: int, running: int, timeout: float = 90) -> list[client.V1Pod]:
    deadline = time.monotonic() + timeout
    while True:
        pods = [pod for pod in job_pods(api, namespace, job) if pod.metadata.deletion_timestamp is None]
        if len(pods) == count and sum(pod.status.phase == "Running" for pod in pods) == running:
            return pods
        assert time.monotonic() < deadline, [(pod.metadata.name, pod.status.phase, pod.spec.node_name) for pod in pods]
        time.sleep(1)


def end_rank(api, namespace: str, pod: client.V1Pod, exit_code: int, message: str, disrupted: bool = False) -> None:
    """The status the kubelet would report for the rank's container ending with EXIT_CODE and MESSAGE (its
    termination message); with DISRUPTED, as a pod the cluster evicted."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status: dict = {
        "phase": "Succeeded" if exit_code == 0 else "Failed",
        "containerStatuses": [
            {
                "name": "train",
                "image": pod.spec.containers[0].image,
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {
                    "running": None,
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": "Completed" if exit_code == 0 else "Error",
                        "message": message,
                        "startedAt": now,
                        "finishedAt": now,
                    },
                },
            }
        ],
    }
    if disrupted:
        status["conditions"] = [
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "lastTransitionTime": now}
        ]
    client.CoreV1Api(api).patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": status})


def stop_deleted_pods(api, namespace: str) -> None:
    """What the kubelet does with a running pod that is deleted: stops its container. (The Job controller marks
    the run Failed only once every rank it stopped has ended.)"""
    for pod in client.CoreV1Api(api).list_namespaced_pod(namespace).items:
        if pod.metadata.deletion_timestamp and pod.status.phase == "Running":
            end_rank(api, namespace, pod, 143, "stopped: its pod was deleted")


def job_condition(api, namespace: str, job: str, timeout: float = 60) -> client.V1JobCondition:
    """The Job's Complete or Failed condition, once it has one."""
    deadline = time.monotonic() + timeout
    while True:
        stop_deleted_pods(api, namespace)
        conditions = client.BatchV1Api(api).read_namespaced_job(job, namespace).status.conditions or ()
        final = [c for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"]
        if final:
            return final[0]
        assert time.monotonic() < deadline, conditions
        time.sleep(1)


# --- placement ------------------------------------------------------------------------------------


def test_two_gpu_ranks_run_one_on_each_gpu_node_and_rank_zero_has_its_dns_name(helm, kubeconfig, api, namespace):  # noqa: F811
    done = helm_install(helm, kubeconfig, namespace, "gpu", *EKS_GPU)
    assert done.returncode == 0, done.stderr
    job = "gpu-mnist-train"
    assert f"logs -f -l {JOB_NAME}={job},{INDEX}=0" in done.stdout  # NOTES.txt: where to follow rank 0

    pods = wait_for_pods(api, namespace, job, count=2, running=2)
    assert [pod.spec.node_name for pod in pods] != [None, None]
    assert sorted(pod.spec.node_name for pod in pods) == ["gpu-0", "gpu-1"]
    for index, pod in enumerate(pods):
        (container,) = pod.spec.containers
        assert (
            container.resources.limits["nvidia.com/gpu"] == "1"
            and container.resources.requests["nvidia.com/gpu"] == "1"
        )
        # The Job controller names pod INDEX JOB-INDEX, under the headless Service: JOB-INDEX.SERVICE.
        assert (pod.spec.hostname, pod.spec.subdomain) == (f"{job}-{index}", job)
        assert {e.name: e.value for e in container.env}["MASTER_ADDR"] == f"{job}-0.{job}"

    # The Service's DNS records: the EndpointSlice controller lists each rank under its host name.
    deadline = time.monotonic() + 30
    while True:
        slices = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={job}"
        )
        names = {
            endpoint.hostname: endpoint.addresses[0]
            for s in slices.items
            for endpoint in s.endpoints or ()
            if endpoint.hostname
        }
        if len(names) == 2:
            break
        assert time.monotonic() < deadline, slices
        time.sleep(1)
    assert names == {f"{job}-{index}": pod.status.pod_ip for index, pod in enumerate(pods)}


def test_more_ranks_than_gpus_leave_the_extra_rank_pending_and_it_says_why(helm, kubeconfig, api, namespace):  # noqa: F811
    done = helm_install(helm, kubeconfig, namespace, "gpu", *EKS_GPU, "--set", "ranks=3")
    assert done.returncode == 0, done.stderr
    pods = wait_for_pods(api, namespace, "gpu-mnist-train", count=3, running=2)
    one_pod_per_gpu_node_and_one_pending(api, namespace, pods)


# --- the failure policy, as the real Job controller applies it ----------------------------------------------


def test_a_rank_that_exits_non_zero_fails_the_whole_run_at_once(helm, kubeconfig, api, namespace):  # noqa: F811
    done = helm_install(helm, kubeconfig, namespace, "cpu", "--set", "ranks=2")
    assert done.returncode == 0, done.stderr
    rank0, rank1 = wait_for_pods(api, namespace, "cpu-mnist-train", count=2, running=2)
    end_rank(api, namespace, rank1, 1, "RuntimeError: Connection closed by peer")
    condition = job_condition(api, namespace, "cpu-mnist-train")
    assert (condition.type, condition.reason) == ("Failed", "PodFailurePolicy"), condition
    assert f"{rank1.metadata.name} failed with exit code 1 matching FailJob rule" in condition.message
    # The Job controller stopped the other rank (deleted its pod) instead of leaving it waiting in a collective.
    assert client.BatchV1Api(api).read_namespaced_job("cpu-mnist-train", namespace).status.succeeded in (None, 0)
    assert not [p for p in job_pods(api, namespace, "cpu-mnist-train") if p.status.phase == "Running"]
    assert rank0.metadata.name not in {p.metadata.name for p in job_pods(api, namespace, "cpu-mnist-train")} or (
        client.CoreV1Api(api).read_namespaced_pod(rank0.metadata.name, namespace).status.phase == "Failed"
    )


def test_a_rank_the_cluster_took_away_is_made_again_and_the_run_goes_on(helm, kubeconfig, api, namespace):  # noqa: F811
    done = helm_install(helm, kubeconfig, namespace, "cpu", "--set", "ranks=2")
    assert done.returncode == 0, done.stderr
    _, rank1 = wait_for_pods(api, namespace, "cpu-mnist-train", count=2, running=2)
    end_rank(api, namespace, rank1, 137, "evicted", disrupted=True)
    deadline = time.monotonic() + 60
    while not [
        p
        for p in job_pods(api, namespace, "cpu-mnist-train")
        if p.metadata.labels[INDEX] == "1" and p.metadata.name != rank1.metadata.name
    ]:
        assert time.monotonic() < deadline, "no new pod for rank 1"
        time.sleep(1)
    job = client.BatchV1Api(api).read_namespaced_job("cpu-mnist-train", namespace)
    assert not [c for c in job.status.conditions or () if c.type == "Failed"]
    assert not job.status.failed  # ignored: not counted against the run


# --- make train-cluster ---------------------------------------------------------------------------


def finished(api, namespace: str, run: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """The script's output once it ends, playing the kubelet for the pods the Job controller deletes meanwhile."""
    deadline = time.monotonic() + timeout
    while run.poll() is None:
        assert time.monotonic() < deadline, "train-cluster.sh did not end"
        stop_deleted_pods(api, namespace)
        time.sleep(1)
    return run.communicate()


def train_cluster(kubeconfig, namespace: str, *arguments: str) -> subprocess.Popen:  # noqa: F811
    return subprocess.Popen(
        [str(ROOT / "scripts" / "train-cluster.sh"), "--namespace", namespace, "--release", "run", *arguments],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_train_cluster_says_where_the_logs_are_and_ends_with_the_version_rank_zero_published(
    helm, kubeconfig, api, namespace
):  # noqa: F811
    run = train_cluster(kubeconfig, namespace, "--ranks", "2", "--train-flags", "--epochs 1")
    rank0, rank1 = wait_for_pods(api, namespace, "run-mnist-train", count=2, running=2)
    assert "--epochs 1" in {e.name: e.value for e in rank0.spec.containers[0].env}["TRAIN_FLAGS"]
    end_rank(api, namespace, rank1, 0, "rank 1 of 2: trained; rank 0 archives and publishes")
    published = "published version 7: mnist.mar, 1.1 MiB in 2 chunks, sha256 abc, test accuracy 99.31 %"
    end_rank(api, namespace, rank0, 0, published + "\n")
    out, err = finished(api, namespace, run)
    assert run.returncode == 0, err
    assert out.splitlines()[-1] == published
    assert f"follow rank 0: kubectl --namespace {namespace} logs -f -l {JOB_NAME}=run-mnist-train,{INDEX}=0" in err
    # The ranks' phases as they change, after where to follow them.
    assert err.index("follow rank 0") < err.index("train-cluster: ranks: 2 ")

    # Again, and this time a rank fails: the finished Job goes first, and the failure is told with the rank's message.
    run = train_cluster(kubeconfig, namespace, "--ranks", "2")
    pods = wait_for_pods(api, namespace, "run-mnist-train", count=2, running=2)
    assert rank0.metadata.uid not in {pod.metadata.uid for pod in pods}
    end_rank(api, namespace, pods[0], 1, "Traceback (most recent call last):\nRuntimeError: the database is down")
    out, err = finished(api, namespace, run)
    assert run.returncode == 1 and "published version" not in out
    assert "deleting the previous run's Job run-mnist-train" in err
    assert "the run failed: PodFailurePolicy" in err and "RuntimeError: the database is down" in err
    assert "nothing was published by this run" in err


def test_train_cluster_refuses_a_bad_rank_count_before_it_changes_anything(kubeconfig, api, namespace):  # noqa: F811
    run = train_cluster(kubeconfig, namespace, "--ranks", "0")
    out, err = run.communicate(timeout=120)
    assert run.returncode != 0 and "/ranks" in err and "minimum" in err
    assert not client.BatchV1Api(api).list_namespaced_job(namespace).items
