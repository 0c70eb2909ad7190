"""k8s/: the EKS cluster config and its script, and the GPU pods of both charts (serving, training) fit exactly the
GPU nodes of the EKS cluster config and of the simulated cluster (k8s/kwok)."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from helm_chart import CASES, TRAIN_CHART, render, server_pod

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"


WRITER_TOKEN_SECRET = "mnist-train-astra-token"


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


@pytest.fixture(scope="module")
def job(helm) -> dict:
    """The training Job as charts/mnist-train renders it for EKS (values-eks-gpu.yaml)."""
    objects = render(
        helm, "--values", str(TRAIN_CHART / "values-eks-gpu.yaml"), chart=TRAIN_CHART, release="mnist-train"
    )
    (job,) = [o for o in objects if o["kind"] == "Job"]
    return job


def test_the_training_job_uses_the_serving_charts_bundle_and_the_writers_token(job):
    values = yaml.safe_load((ROOT / "charts" / "mnist-serve" / "values-eks-gpu.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    secrets = {volume["name"]: volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}
    # The chart's bundle, and a token of its own: the writer role's, never the serving pods' reader token.
    assert secrets == {"astra-bundle": values["astra"]["bundleSecret"]["name"], "astra-token": WRITER_TOKEN_SECRET}
    assert WRITER_TOKEN_SECRET != values["astra"]["tokenSecret"]["name"]
    env = {item["name"]: item["value"] for item in pod["containers"][0]["env"]}
    assert env["CASSANDRA_KEYSPACE"] == values["cassandra"]["keyspace"]
    assert "ASTRA_DB_TOKEN" not in env and env["ASTRA_DB_TOKEN_FILE"].endswith(
        "/" + values["astra"]["tokenSecret"]["key"]
    )


def gpu_node_group() -> dict:
    (cluster,) = load("eks-cluster.yaml")
    return next(group for group in cluster["managedNodeGroups"] if group["name"] == "gpu")


def test_the_eks_gpu_node_group_is_tainted_like_eks_gpu_groups():
    group = gpu_node_group()
    assert group["instanceType"].startswith("g4dn.")
    assert group["taints"] == [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]
    assert group["labels"]["nvidia.com/gpu.present"] == "true"


def fits(pod: dict, labels: dict, taints: list[dict]) -> bool:
    """The scheduler's node-selector and NoSchedule-taint rules (the two the chart relies on)."""
    if any(labels.get(key) != value for key, value in pod.get("nodeSelector", {}).items()):
        return False

    def tolerated(taint: dict) -> bool:
        return any(
            t.get("key") in (None, taint["key"])
            and t.get("effect") in (None, taint["effect"])
            and (t.get("operator") == "Exists" or t.get("value") == taint.get("value"))
            for t in pod.get("tolerations", [])
        )

    return all(tolerated(taint) for taint in taints if taint["effect"] in ("NoSchedule", "NoExecute"))


def test_gpu_pods_fit_only_the_gpu_node_group(helm, job):  # noqa: F811
    group = gpu_node_group()
    # EKS labels every node of a managed node group with its name.
    labels = {
        **group["labels"],
        "eks.amazonaws.com/nodegroup": group["name"],
        "node.kubernetes.io/instance-type": group["instanceType"],
    }
    gpu_pod = server_pod(render(helm, *CASES["eks-gpu"]))["spec"]
    cpu_pod = server_pod(render(helm))["spec"]
    assert fits(gpu_pod, labels, group["taints"])
    assert not fits(cpu_pod, labels, group["taints"])
    cpu_group = {"eks.amazonaws.com/nodegroup": "cpu"}
    assert fits(cpu_pod, cpu_group, []) and not fits(gpu_pod, cpu_group, [])
    assert fits(job["spec"]["template"]["spec"], labels, group["taints"])
    # One rank per GPU node: the node group can hold every rank of the EKS values at once.
    assert job["spec"]["parallelism"] <= group["maxSize"]


def test_gpu_pods_fit_only_the_simulated_gpu_nodes(helm):  # noqa: F811
    """The same on the nodes of the local simulated cluster (k8s/kwok/nodes.yaml, scripts/cluster.sh)."""
    nodes = load("kwok/nodes.yaml")
    gpu_pod = server_pod(render(helm, *CASES["eks-gpu"]))["spec"]
    cpu_pod = server_pod(render(helm))["spec"]
    for node in nodes:
        labels, taints = node["metadata"]["labels"], node["spec"].get("taints", [])
        has_gpu = "nvidia.com/gpu" in node["status"]["allocatable"]
        assert fits(gpu_pod, labels, taints) == has_gpu, node["metadata"]["name"]
        assert fits(cpu_pod, labels, taints) == (not has_gpu), node["metadata"]["name"]


def test_the_kind_cluster_is_the_one_the_smoke_test_deletes():
    (config,) = load("kind-cluster.yaml")
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4" and config["kind"] == "Cluster"
    assert f"CLUSTER={config['name']}" in (K8S / "kind-smoke.sh").read_text()
    assert config["networking"]["apiServerAddress"] == "127.0.0.1"


# --- k8s/eks.sh: the EKS path's commands, as DRY_RUN=1 prints them (no AWS account here) -----------------------


def eks(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(K8S / "eks.sh"), *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1"},
    )


def planned(*arguments: str) -> list[list[str]]:
    done = eks(*arguments)
    assert done.returncode == 0, done.stdout + done.stderr
    return [shlex.split(line.replace("<(", "'<(").replace(") |", ")' |")) for line in done.stdout.splitlines()]


def test_the_eks_cluster_enforces_network_policies_and_serves_the_hpa_its_metrics():
    (cluster,) = load("eks-cluster.yaml")
    addons = {addon["name"]: addon for addon in cluster["addons"]}
    # Without the VPC CNI's policy agent, the chart's NetworkPolicy is accepted and does nothing.
    assert json.loads(addons["vpc-cni"]["configurationValues"])["enableNetworkPolicy"] == "true"
    values = yaml.safe_load((ROOT / "charts" / "mnist-serve" / "values-eks-gpu.yaml").read_text())
    assert values["autoscaling"]["enabled"] and "metrics-server" in addons  # the HPA reads CPU use from it
    assert values["autoscaling"]["maxReplicas"] <= gpu_node_group()["maxSize"]


def test_eks_up_makes_the_ecr_repository_in_the_cluster_files_region():
    (cluster,) = load("eks-cluster.yaml")
    commands = planned("up")
    assert commands[0][:3] == ["eksctl", "create", "cluster"] and commands[0][-1] == str(K8S / "eks-cluster.yaml")
    (create,) = [c for c in commands if c[:3] == ["aws", "ecr", "create-repository"]]
    assert create[create.index("--region") + 1] == cluster["metadata"]["region"]
    assert create[create.index("--repository-name") + 1] == "mnist-serve"


def test_eks_secrets_make_two_tokens_for_two_roles_where_the_chart_and_the_job_read_them(job):
    values = yaml.safe_load((ROOT / "charts" / "mnist-serve" / "values-eks-gpu.yaml").read_text())
    made = [c[c.index("generic") + 1] for c in planned("secrets", "bundle.zip") if "generic" in c]
    reader = values["astra"]["tokenSecret"]["name"]
    job_secrets = {v["secret"]["secretName"] for v in job["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert made == [values["astra"]["bundleSecret"]["name"], reader, WRITER_TOKEN_SECRET]
    assert WRITER_TOKEN_SECRET in job_secrets and reader not in job_secrets
    missing = eks("secrets")
    assert missing.returncode == 1 and "needs the secure connect bundle" in missing.stderr


def test_eks_push_and_install_agree_on_the_image():
    chart = yaml.safe_load((ROOT / "charts" / "mnist-serve" / "Chart.yaml").read_text())
    pushed = {c[2] for c in planned("push") if c[:2] == ["docker", "push"]}
    assert pushed == {f"ECR_URI:{chart['appVersion']}-gpu", f"ECR_URI:{chart['appVersion']}-gpu-train"}
    helm_install = next(c for c in planned("install") if c[:2] == ["helm", "upgrade"])
    assert "image.repository=ECR_URI" in helm_install and str(ROOT / "charts/mnist-serve/values-eks-gpu.yaml") in (
        helm_install
    )


def test_eks_down_removes_everything_it_made_release_first_cluster_last():
    order = [" ".join(c[:3]) for c in planned("down")]
    assert order == [
        "helm uninstall mnist-serve",
        "kubectl delete namespace",
        "aws ecr delete-repository",
        "eksctl delete cluster",
    ]
    wrong = eks("teardown")
    assert wrong.returncode == 1 and "expected up, push, secrets, train, install or down" in wrong.stderr


def test_eks_train_runs_the_training_chart_with_the_pushed_training_image(job):
    (command,) = planned("train", "3")
    assert command[0] == str(ROOT / "scripts" / "train-cluster.sh")
    assert command[command.index("--ranks") + 1] == "3" and command[command.index("--namespace") + 1] == "mnist"
    assert command[command.index("--values") + 1] == str(TRAIN_CHART / "values-eks-gpu.yaml")
    assert command[command.index("--") + 1 :] == ["--set", "image.repository=ECR_URI"]
    # The tag the chart then runs is the one k8s/eks.sh push pushed.
    pushed = {c[2] for c in planned("push") if c[:2] == ["docker", "push"]}
    assert job["spec"]["template"]["spec"]["containers"][0]["image"].replace("mnist-serve:", "ECR_URI:") in pushed
    assert eks("train", "none").returncode == 1
