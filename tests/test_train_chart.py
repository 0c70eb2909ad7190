"""The training chart (charts/mnist-train) as the real helm renders it: an Indexed Job of `ranks` torchrun pods and
the headless Service that names rank 0, valid Kubernetes 1.36 objects; the command lines each rank runs, parsed by
the real parsers; the GPU switch, the locked-down pods, the failure policy, the Secrets, and bad values refused by
the schema. The same chart on a control plane with simulated GPU nodes is tests/test_train_chart_cluster.py's."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib

import kubernetes_validate
import pytest
import yaml
from helm_chart import CHART, KUBE_VERSION, ROOT, TRAIN_CHART, refused, render, run_helm, values_without_a_comment

RELEASE = "mnist-train"
EKS_GPU = ["--values", str(TRAIN_CHART / "values-eks-gpu.yaml")]
KIND = ["--values", str(TRAIN_CHART / "values-kind.yaml")]
CASES = {
    "default": [],
    "kind": KIND,
    "eks-gpu": EKS_GPU,
    # Every optional part on, so each is rendered and validated too.
    "everything": [
        *EKS_GPU,
        "--set",
        "ranks=4",
        "--set",
        "gpu.runtimeClassName=nvidia",
        "--set",
        "networkPolicy.egressTo[0].ipBlock.cidr=10.0.0.0/8",
        "--set",
        "imagePullSecrets[0].name=registry",
        "--set",
        "priorityClassName=training",
        "--set",
        "serviceAccountName=mnist-train",
        "--set",
        "podAnnotations.team=ml",
    ],
    # A self-hosted cluster with a login and TLS with client certificates.
    "self-hosted": [
        "--set",
        "cassandra.hosts[0]=cassandra.db.svc",
        "--set",
        "cassandra.auth.secretName=cassandra-writer",
        "--set",
        "cassandra.tls.enabled=true",
        "--set",
        "cassandra.tls.secretName=cassandra-tls",
        "--set",
        "cassandra.tls.clientCertificate=true",
    ],
}
GPU_CASES = {"eks-gpu", "everything"}
# Blocks handed to Kubernetes as they are, documented by the comment above their key.
PASS_THROUGH = {"podSecurityContext", "securityContext", "nodeSelector", "tolerations", "ncclEnv"}


def render_train(helm, *args: str) -> list[dict]:
    return render(helm, *args, chart=TRAIN_CHART, release=RELEASE)


def refused_train(helm, *args: str) -> str:
    return refused(helm, *args, chart=TRAIN_CHART, release=RELEASE)


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def pod_spec(objects: list[dict]) -> dict:
    return one(objects, "Job")["spec"]["template"]["spec"]


def container(objects: list[dict]) -> dict:
    (train,) = pod_spec(objects)["containers"]
    return train


def env_of(train: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in train.get("env", []) if "value" in item}


def script(objects: list[dict]) -> str:
    train = container(objects)
    assert train["command"] == ["bash", "-c"]
    return train["args"][0]


def command_line(objects: list[dict], program: str, rank: int) -> list[str]:
    """The script's line starting with PROGRAM as the shell would run it on pod RANK: the variables replaced by
    the values the pod's environment gives them (JOB_COMPLETION_INDEX: RANK), split into words."""
    env = {**env_of(container(objects)), "JOB_COMPLETION_INDEX": str(rank)}
    text = script(objects)
    assert "rank=$JOB_COMPLETION_INDEX" in text
    env["rank"] = env["JOB_COMPLETION_INDEX"]
    (line,) = [line.strip() for line in text.splitlines() if line.strip().startswith(program + " ")]
    expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], line.split(" | ")[0])
    return shlex.split(expanded)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, helm) -> tuple[str, list[dict]]:
    return request.param, render_train(helm, *CASES[request.param])


# --- lint and schema validation --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_helm_lint_strict_passes(helm, name):
    done = run_helm(helm, "lint", "--strict", str(TRAIN_CHART), *CASES[name])
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_object_is_valid_against_the_kubernetes_schemas(case):
    name, objects = case
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)  # strict: unknown fields fail too
        except kubernetes_validate.ValidationError as error:
            pytest.fail(
                f"{name}: {obj['kind']}/{obj['metadata']['name']} at {'.'.join(map(str, error.path))}: {error.message}"
            )
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["Job", "NetworkPolicy", "Service"], kinds
    assert not any(o["kind"] == "Secret" for o in objects)  # the chart never holds a credential itself


# --- ranks: an Indexed Job and the headless Service that names rank 0 -----------------------------------


@pytest.mark.parametrize("ranks", [1, 3])
def test_one_pod_per_rank_all_at_once_each_with_its_index_as_node_rank(helm, ranks):
    objects = render_train(helm, "--set", f"ranks={ranks}")
    job = one(objects, "Job")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == ranks
    env = env_of(container(objects))
    assert env["MNIST_TRAIN_RANKS"] == str(ranks)
    for rank in range(ranks):
        torchrun = command_line(objects, "torchrun", rank)
        assert f"--node-rank={rank}" in torchrun and f"--nnodes={ranks}" in torchrun
        assert "--nproc-per-node=1" in torchrun and "--rdzv-backend=static" in torchrun


def test_rank_zero_is_reached_by_its_pod_name_under_the_headless_service(helm):
    objects = render_train(helm, "--set", "ranks=3")
    job, service = one(objects, "Job"), one(objects, "Service")
    pod = job["spec"]["template"]
    # An Indexed Job's pod INDEX has the host name JOB-INDEX; with the Service as its subdomain it resolves as
    # JOB-INDEX.SERVICE in the namespace.
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    env = env_of(container(objects))
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    torchrun = command_line(objects, "torchrun", 2)
    assert f"--master-addr={env['MASTER_ADDR']}" in torchrun and "--master-port=29500" in torchrun
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [p["port"] for p in service["spec"]["ports"]] == [29500]
    # A pod's host name is a DNS label (63 characters at most): the name leaves room for the index.
    long_name = render_train(helm, "--set", "fullnameOverride=" + "a" * 63, "--set", "ranks=2")
    assert len(one(long_name, "Job")["metadata"]["name"]) + len("-999999") <= 63


def test_every_rank_waits_a_bounded_time_for_rank_zero_and_says_which_address(helm):
    text = script(render_train(helm, "--set", "rendezvous.timeoutSeconds=120"))
    assert 'getent hosts "$MASTER_ADDR"' in text and "rank 0's address $MASTER_ADDR did not resolve" in text
    assert (
        env_of(container(render_train(helm, "--set", "rendezvous.timeoutSeconds=120")))["RENDEZVOUS_TIMEOUT"] == "120"
    )
    assert "--rdzv-conf=timeout=120" in command_line(
        render_train(helm, "--set", "rendezvous.timeoutSeconds=120"), "torchrun", 1
    )


def test_each_rank_runs_the_real_training_command_and_rank_zero_alone_archives_and_publishes(helm):
    """Each command line of the pod's script, parsed by the parser of the program that will run it."""
    from torch.distributed.run import get_args_parser

    from registry import cli as registry_cli
    from training import cli

    objects = render_train(helm, *EKS_GPU, "--set-string", "trainFlags=--epochs 3 --seed 2")
    torchrun = get_args_parser().parse_args(command_line(objects, "torchrun", 1)[1:])
    assert torchrun.module and torchrun.training_script == "training"
    assert (torchrun.nnodes, torchrun.nproc_per_node, torchrun.node_rank) == ("2", "1", 1)
    train = cli.parser().parse_args(torchrun.training_script_args)
    assert (train.command, train.source, train.checkpoints, train.device, str(train.out)) == (
        "train",
        "cassandra",
        "cassandra",
        "cuda",
        "/work/out",
    )
    assert (train.epochs, train.seed) == (3, 2)

    archive = command_line(objects, "python -m handler.archive", 0)
    archive_help = subprocess.run(
        [sys.executable, "-m", "handler.archive", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert all(flag in archive_help.stdout for flag in archive[3::2])
    publish = registry_cli.parser().parse_args(command_line(objects, "python -m registry.cli", 0)[3:])
    assert publish.command == "publish" and str(publish.archive) == f"{archive[-1]}/mnist.mar"
    assert str(publish.metrics) == f"{train.out}/metrics.json" and f"{train.out}/model.pt" in archive
    # Rank 0 alone: the other ranks stop before the archive, and rank 0's publish line is its termination message.
    text = script(objects)
    stop = text.index("if ((rank > 0)); then")
    assert stop < text.index("exit 0", stop) < text.index("python -m handler.archive")
    assert text.rstrip().endswith("| tee /dev/termination-log")
    assert text.startswith("set -o errexit -o nounset -o pipefail")  # a failed step stops the rest
    assert container(objects)["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_the_run_records_its_job_image_and_ranks_for_the_lineage(helm):
    objects = render_train(helm, "--set", "ranks=3", "--set", "image.repository=ecr.example/mnist-serve")
    env = env_of(container(objects))
    assert env["MNIST_TRAIN_JOB"] == one(objects, "Job")["metadata"]["name"] == "mnist-train"
    assert env["MNIST_TRAIN_IMAGE"] == container(objects)["image"] == "ecr.example/mnist-serve:0.1.0-cpu-train"
    assert env["MNIST_TRAIN_RANKS"] == "3"


# --- GPU -------------------------------------------------------------------------------------------


def test_gpu_limits_selector_tolerations_and_nccl_exactly_when_the_switch_is_on(case):
    name, objects = case
    pod, train = pod_spec(objects), container(objects)
    env = env_of(train)
    limits = train["resources"].get("limits", {})
    tolerated = [t for t in pod.get("tolerations", []) if t.get("key") == "nvidia.com/gpu"]
    selector = pod.get("nodeSelector", {})
    if name in GPU_CASES:
        assert limits["nvidia.com/gpu"] == 1
        assert tolerated == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert selector["nvidia.com/gpu.present"] == "true" and selector["eks.amazonaws.com/nodegroup"] == "gpu"
        assert env["DEVICE"] == "cuda" and env["NCCL_DEBUG"] == "WARN"
        assert train["image"].endswith("-gpu-train")
    else:
        assert "nvidia.com/gpu" not in str(objects)
        assert not tolerated and not any(key.startswith("nvidia.com") for key in selector)
        assert env["DEVICE"] == "cpu" and not any(key.startswith("NCCL_") for key in env)
        assert "runtimeClassName" not in pod
        assert train["image"].endswith("-cpu-train")
    assert ("runtimeClassName" in pod) == (name == "everything")


def test_gpu_count_and_device_follow_the_values(helm):
    objects = render_train(helm, "--set", "gpu.enabled=true", "--set", "gpu.count=2", "--set", "device=cpu")
    assert container(objects)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert env_of(container(objects))["DEVICE"] == "cpu"
    assert container(objects)["image"] == "mnist-serve:0.1.0-gpu-train"


def test_shared_memory_is_a_memory_backed_volume(case):
    """DDP, NCCL and the data loader's workers pass tensors through /dev/shm; a runtime's default is 64 MiB."""
    _, objects = case
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    (shm,) = [m for m in container(objects)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory" and volumes[shm["name"]]["emptyDir"]["sizeLimit"]


# --- security --------------------------------------------------------------------------------------


def test_pods_run_locked_down_as_the_serving_pods_do(case, helm):
    name, objects = case
    pod, train = pod_spec(objects), container(objects)
    serving = yaml.safe_load((CHART / "values.yaml").read_text())
    assert pod["securityContext"] == serving["podSecurityContext"]
    assert train["securityContext"] == serving["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert train["securityContext"]["readOnlyRootFilesystem"] is True
    assert train["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False


def test_the_writable_paths_are_emptydirs_and_every_other_mount_is_read_only(case):
    _, objects = case
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    mounts = {m["mountPath"]: m for m in container(objects)["volumeMounts"]}
    writable = {"/work", "/tmp", "/dev/shm"}
    assert writable <= set(mounts)
    for path, mount in mounts.items():
        if path in writable:
            assert volumes[mount["name"]]["emptyDir"]["sizeLimit"], path
        else:
            assert mount.get("readOnly") is True and "secret" in volumes[mount["name"]], path
    # Where training writes: --out, and the image's caches (XDG_CACHE_HOME, MPLCONFIGDIR) under /tmp.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "XDG_CACHE_HOME=/tmp/" in dockerfile and "MPLCONFIGDIR=/tmp/" in dockerfile
    assert "--out /work/out" in script(objects)


def test_astra_credentials_come_from_secrets_as_files_with_the_writers_token(helm):
    objects = render_train(helm, *EKS_GPU)
    env = env_of(container(objects))
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod_spec(objects)["volumes"] if "secret" in v}
    serving = yaml.safe_load((CHART / "values-eks-gpu.yaml").read_text())["astra"]
    # The serving chart's bundle, and the writer role's token that k8s/eks.sh secrets makes (not the reader's).
    assert secrets == {"astra-bundle": serving["bundleSecret"]["name"], "astra-token": "mnist-train-astra-token"}
    assert 'WRITER_TOKEN_SECRET="mnist-train-astra-token"' in (ROOT / "k8s" / "eks.sh").read_text()
    assert secrets["astra-token"] != serving["tokenSecret"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    assert env["ASTRA_DB_TOKEN_FILE"] == f"{mounts['astra-token']}/token"
    assert env["ASTRA_DB_SECURE_BUNDLE"] == f"{mounts['astra-bundle']}/secure-connect-bundle.zip"
    assert "ASTRA_DB_TOKEN" not in env and "CASSANDRA_HOSTS" not in env
    assert env["CASSANDRA_KEYSPACE"] == "mnist"


def test_the_database_settings_are_the_serving_charts(helm):
    """The same values give both charts' pods the same database variables, so a setting means one thing."""
    flags = [arg for arg in CASES["self-hosted"]]
    trained = container(render_train(helm, *flags))["env"]
    served = next(o for o in render(helm, *flags) if o["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]["env"]

    def database(env: list[dict]) -> list[dict]:
        return [item for item in env if item["name"].startswith(("CASSANDRA_", "ASTRA_DB_"))]

    assert database(trained) == database(served)
    assert {"name": "cassandra-writer", "key": "username"} in [
        item.get("valueFrom", {}).get("secretKeyRef") for item in trained
    ]


# --- the failure policy ----------------------------------------------------------------------------


def test_any_failed_rank_fails_the_whole_run_and_a_disrupted_pod_is_made_again(case):
    _, objects = case
    spec = one(objects, "Job")["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    assert (spec["backoffLimitPerIndex"], spec["maxFailedIndexes"], spec["backoffLimit"]) == (0, 0, 0)
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "train", "operator": "NotIn", "values": [0]}},
    ]
    assert spec["activeDeadlineSeconds"] == 7200 and spec["ttlSecondsAfterFinished"] == 604800


def test_deadline_and_time_to_live_are_values(helm):
    spec = one(render_train(helm, "--set", "activeDeadlineSeconds=60", "--set", "ttlSecondsAfterFinished=0"), "Job")[
        "spec"
    ]
    assert (spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (60, 0)


# --- network policy --------------------------------------------------------------------------------


def test_the_ranks_reach_each_other_dns_and_the_database_and_nothing_else_reaches_them(helm):
    objects = render_train(helm, "--set", "networkPolicy.egressTo[0].ipBlock.cidr=10.0.0.0/8")
    policy = one(objects, "NetworkPolicy")["spec"]
    labels = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    ((peer,),) = [rule["from"] for rule in policy["ingress"]]
    assert (
        peer["podSelector"]["matchLabels"] == policy["podSelector"]["matchLabels"]
        and "ports" not in policy["ingress"][0]
    )
    egress = policy["egress"]
    assert egress[0] == {"to": [{"podSelector": {"matchLabels": policy["podSelector"]["matchLabels"]}}]}
    assert sorted(p["port"] for rule in egress[1:] for p in rule["ports"]) == [53, 53, 9042, 29042, 29080]
    assert egress[-1]["to"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert not [o for o in render_train(helm, "--set", "networkPolicy.enabled=false") if o["kind"] == "NetworkPolicy"]


# --- values refused at install time ----------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, where",
    [
        ("ranks=0", "/ranks"),
        ("ranks=two", "/ranks"),
        ("device=tpu", "/device"),
        ("gpu.count=0", "/gpu/count"),
        ("gpu.ncclEnv.LD_PRELOAD=evil.so", "/gpu/ncclEnv"),
        ("astra.token=AstraCS:abcdef", "/astra"),
        ("cassandra.auth.password=s3cret", "/cassandra/auth"),
        ("cassandra.tls.enabled=true", "/cassandra/tls/secretName"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("rendezvous.port=0", "/rendezvous/port"),
        ("backoffLimit=-1", "/backoffLimit"),
        ("securityContext.readOnlyRootFilesystem=false", "/securityContext/readOnlyRootFilesystem"),
        ("podSecurityContext.runAsNonRoot=false", "/podSecurityContext/runAsNonRoot"),
        ("replicas=3", "additional properties 'replicas' not allowed"),
    ],
)
def test_the_schema_refuses_bad_values_with_its_message(helm, setting, where):
    error = refused_train(helm, "--set", setting)
    assert "values don't meet the specifications of the schema" in error, error
    assert where in error, error


def test_astra_without_secret_names_is_refused(helm):
    error = refused_train(helm, "--set", "astra.enabled=true", "--set", "astra.tokenSecret.name=")
    assert "/astra/tokenSecret/name" in error, error


# --- the chart and its files -----------------------------------------------------------------------


def test_versions_and_image_tags_are_the_projects_and_build_shs():
    chart = yaml.safe_load((TRAIN_CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == project
    kind_tag = yaml.safe_load((TRAIN_CHART / "values-kind.yaml").read_text())["image"]["tag"]
    assert kind_tag == f"{project}-cpu-train"  # what docker/build.sh cpu --train tags
    assert "suffix=-train" in (ROOT / "docker" / "build.sh").read_text()


@pytest.mark.parametrize("name", ["values.yaml", "values-kind.yaml", "values-eks-gpu.yaml"])
def test_every_value_has_a_comment(name):
    missing = values_without_a_comment(TRAIN_CHART / name, PASS_THROUGH)
    assert not missing, f"{name}: values without a comment above them:\n" + "\n".join(missing)


def test_every_value_is_in_the_schema():
    """additionalProperties: false at the top and in each group, so a misspelt value is refused, not ignored."""
    schema = yaml.safe_load((TRAIN_CHART / "values.schema.json").read_text())
    values = yaml.safe_load((TRAIN_CHART / "values.yaml").read_text())
    assert schema["additionalProperties"] is False and set(values) == set(schema["properties"])
    for key, value in values.items():
        if isinstance(value, dict) and "properties" in schema["properties"][key] and key not in PASS_THROUGH:
            assert schema["properties"][key].get("additionalProperties") is False, key
            assert set(value) <= set(schema["properties"][key]["properties"]), key
