"""The Helm chart as the real helm renders it: valid Kubernetes 1.36 objects, the GPU switch, no management
port, the security context, probes, config roll-outs, Secrets by reference, and bad values refused by the schema.

These run everywhere (helm is built by scripts/install-k8s-tools.sh); they are the CI counterpart of the
kind smoke test (tests/test_kind_smoke.py), which needs Docker.
"""

from __future__ import annotations

import json
import re
import tomllib

import kubernetes_validate
import pytest
import yaml
from helm_chart import CASES, CHART, KUBE_VERSION, ROOT, refused, render, run_helm, server_pod, values_without_a_comment

from handler.server import cors_properties

MANAGEMENT_PORT = 8081
CRD_KINDS = {"ServiceMonitor", "HTTPRoute"}  # the Prometheus operator's, the Gateway API's: no built-in schema
GPU_CASES = {"eks-gpu", "everything"}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, helm) -> tuple[str, list[dict]]:
    return request.param, render(helm, *CASES[request.param])


def one(objects: list[dict], kind: str, component: str | None = None) -> dict:
    found = [
        o
        for o in objects
        if o["kind"] == kind
        and (component is None or o["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def server_container(objects: list[dict]) -> dict:
    (container,) = server_pod(objects)["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile (its continuation lines joined), which the chart's mounts must match."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / "Dockerfile").read_text())
    found = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            found.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return found


# --- lint and schema validation --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_helm_lint_strict_passes(helm, name):
    done = run_helm(helm, "lint", "--strict", str(CHART), *CASES[name])
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_object_is_valid_against_the_kubernetes_schemas(case):
    name, objects = case
    validated = 0
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)  # strict: unknown fields fail too
        except kubernetes_validate.ValidationError as error:
            pytest.fail(
                f"{name}: {obj['kind']}/{obj['metadata']['name']} at {'.'.join(map(str, error.path))}: {error.message}"
            )
        validated += 1
    assert (
        validated >= 7
    )  # Deployment, Service, ConfigMap, ServiceAccount, NetworkPolicy, test Pod and ConfigMap at least


def test_what_each_values_file_creates(helm):
    def kinds(objects):
        return sorted(o["kind"] for o in objects)

    assert kinds(render(helm)) == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "Pod",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    assert "PodDisruptionBudget" not in kinds(render(helm, *CASES["kind"]))
    assert kinds(render(helm, *CASES["eks-gpu"])).count("HorizontalPodAutoscaler") == 1
    assert kinds(render(helm, *CASES["everything"])).count("ServiceMonitor") == 1


# --- GPU -------------------------------------------------------------------------------------------


def test_gpu_limits_selector_and_tolerations_exactly_when_the_switch_is_on(case):
    name, objects = case
    pod = server_pod(objects)["spec"]
    container = server_container(objects)
    limits = container["resources"].get("limits", {})
    tolerated = [t for t in pod.get("tolerations", []) if t.get("key") == "nvidia.com/gpu"]
    selector = pod.get("nodeSelector", {})
    requested_anywhere = "nvidia.com/gpu" in json.dumps([o for o in objects if o["kind"] != "Deployment"])
    if name in GPU_CASES:
        assert limits["nvidia.com/gpu"] == 1
        assert tolerated == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert selector["nvidia.com/gpu.present"] == "true"
        assert env_of(container)["NUMBER_OF_GPU"] == "1"
    else:
        assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in container["resources"].get("requests", {})
        assert not tolerated and not any(key.startswith("nvidia.com") for key in selector)
        assert env_of(container)["NUMBER_OF_GPU"] == "0"
        assert "runtimeClassName" not in pod
        assert not requested_anywhere
    assert ("runtimeClassName" in pod) == (name == "everything")


def test_gpu_count_and_runtime_class_follow_the_values(helm):
    objects = render(helm, "--set", "gpu.enabled=true", "--set", "gpu.count=2", "--set", "gpu.runtimeClassName=nvidia")
    assert server_container(objects)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert env_of(server_container(objects))["NUMBER_OF_GPU"] == "2"
    assert server_pod(objects)["spec"]["runtimeClassName"] == "nvidia"
    # The default tag follows the switch: the GPU variant of the image.
    assert server_container(objects)["image"] == "mnist-serve:0.1.0-gpu"
    assert server_container(render(helm))["image"] == "mnist-serve:0.1.0-cpu"


def test_the_helm_test_pod_runs_beside_the_gpu_pods_without_a_gpu(helm):
    test_pod = one(render(helm, *CASES["eks-gpu"]), "Pod")["spec"]
    assert test_pod["nodeSelector"]["eks.amazonaws.com/nodegroup"] == "gpu"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in test_pod["tolerations"]
    assert "nvidia.com/gpu" not in json.dumps(test_pod["containers"][0]["resources"])


# --- the management API stays inside the pod --------------------------------------------------------


def test_no_management_port_anywhere(case):
    name, objects = case
    for obj in objects:
        for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []) + obj.get(
            "spec", {}
        ).get("containers", []):
            for port in container.get("ports", []):
                assert port["containerPort"] != MANAGEMENT_PORT, f"{name}: container port {port}"
                assert "manage" not in port.get("name", "") and "mgmt" not in port.get("name", "")
        if obj["kind"] == "Service":
            for port in obj["spec"]["ports"]:
                assert MANAGEMENT_PORT not in (port["port"], port["targetPort"]) and "manage" not in port["name"], (
                    f"{name}: {port}"
                )
                assert port["targetPort"] in ("http", "metrics")
        if obj["kind"] == "NetworkPolicy":
            ingress_ports = [p["port"] for rule in obj["spec"]["ingress"] for p in rule["ports"]]
            assert sorted(ingress_ports) == ["http", "metrics"]
    assert {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]} == {
        "http": 8080,
        "metrics": 8082,
    }
    # 8081 appears once in all that is rendered: the loopback management address in config.properties.
    text = yaml.safe_dump_all(objects)
    assert text.count(str(MANAGEMENT_PORT)) == 1 and "management_address=http://127.0.0.1:8081" in text


# --- security --------------------------------------------------------------------------------------


def test_pods_run_locked_down(case):
    name, objects = case
    for pod_spec in (server_pod(objects)["spec"], one(objects, "Pod")["spec"]):
        context = pod_spec["securityContext"]
        assert (
            context["runAsNonRoot"] is True
            and context["runAsUser"] == 1000
            and context["seccompProfile"] == {"type": "RuntimeDefault"}
        )
        assert pod_spec["automountServiceAccountToken"] is False
        for container in pod_spec["containers"]:
            c = container["securityContext"]
            assert (
                c["readOnlyRootFilesystem"] is True
                and c["allowPrivilegeEscalation"] is False
                and c["privileged"] is False
            )
            assert c["capabilities"] == {"drop": ["ALL"]}


def test_the_writable_paths_are_the_images_and_emptydirs(case):
    """readOnlyRootFilesystem leaves only mounted volumes writable: each path the entrypoint writes to
    (the Dockerfile's ENV) must be an emptyDir mount, and every other mount read-only."""
    _, objects = case
    pod = server_pod(objects)["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in server_container(objects)["volumeMounts"]}
    env = image_env()
    writable = {env["TMPDIR"], env["LOG_DIR"], env["MODEL_STORE"]}
    assert writable == {"/tmp", "/home/model-server/logs", "/home/model-server/model-store"}
    for path, mount in mounts.items():
        if path in writable:
            assert "emptyDir" in volumes[mount["name"]] and volumes[mount["name"]]["emptyDir"]["sizeLimit"]
        else:
            assert mount.get("readOnly") is True, path
    assert writable <= set(mounts)


def test_astra_credentials_come_from_secrets_as_files(helm):
    objects = render(helm, *CASES["eks-gpu"])
    pod = server_pod(objects)["spec"]
    env = env_of(server_container(objects))
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert {s["secretName"] for s in secrets.values()} == {"mnist-serve-astra-bundle", "mnist-serve-astra-token"}
    mounts = {m["name"]: m["mountPath"] for m in server_container(objects)["volumeMounts"]}
    assert env["ASTRA_DB_TOKEN_FILE"] == f"{mounts['astra-token']}/token"
    assert env["ASTRA_DB_SECURE_BUNDLE"] == f"{mounts['astra-bundle']}/secure-connect-bundle.zip"
    assert "ASTRA_DB_TOKEN" not in env and "CASSANDRA_HOSTS" not in env
    assert not any(o["kind"] == "Secret" for o in objects)  # the chart never holds a credential itself


def test_a_self_hosted_clusters_login_and_certificates_come_from_secrets_as_files(helm):
    objects = render(helm, *CASES["self-hosted"])
    container = server_container(objects)
    env = env_of(container)
    (username,) = [
        item["valueFrom"]["secretKeyRef"] for item in container["env"] if item["name"] == "CASSANDRA_USERNAME"
    ]
    assert username == {"name": "cassandra-login", "key": "username"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["CASSANDRA_PASSWORD_FILE"] == f"{mounts['cassandra-auth']}/password" and "CASSANDRA_PASSWORD" not in env
    assert (env["CASSANDRA_TLS_CA_FILE"], env["CASSANDRA_TLS_CERT_FILE"], env["CASSANDRA_TLS_KEY_FILE"]) == tuple(
        f"{mounts['cassandra-tls']}/{name}" for name in ("ca.crt", "tls.crt", "tls.key")
    )
    assert env["CASSANDRA_TLS_VERIFY_HOSTNAME"] == "true"
    volumes = {v["name"]: v["secret"] for v in server_pod(objects)["spec"]["volumes"] if "secret" in v}
    assert volumes["cassandra-auth"]["secretName"] == "cassandra-login" and [
        i["key"] for i in volumes["cassandra-auth"]["items"]
    ] == ["password"]
    assert [i["key"] for i in volumes["cassandra-tls"]["items"]] == ["ca.crt", "tls.crt", "tls.key"]
    # What the entrypoint reads from them: the settings module takes exactly these variables.
    ca_only = env_of(
        server_container(render(helm, "--set", "cassandra.tls.enabled=true", "--set", "cassandra.tls.secretName=ca"))
    )
    assert (
        "CASSANDRA_TLS_CA_FILE" in ca_only
        and "CASSANDRA_TLS_CERT_FILE" not in ca_only
        and "CASSANDRA_USERNAME" not in ca_only
    )


def test_service_links_are_off(case):
    """A Service named "cassandra" would otherwise set CASSANDRA_PORT=tcp://... in the pod."""
    _, objects = case
    assert server_pod(objects)["spec"]["enableServiceLinks"] is False


# --- probes and timings ----------------------------------------------------------------------------


def test_startup_waits_for_an_answered_prediction_then_the_probes_ask_ping(case):
    """The entrypoint writes READY_FILE once the model answered; tests/test_container.py runs this probe."""
    _, objects = case
    container = server_container(objects)
    ready_file = env_of(container)["READY_FILE"]
    assert container["startupProbe"]["exec"] == {"command": ["test", "-e", ready_file]}
    assert ready_file.startswith("/tmp/") and any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ping", "port": "http"}, probe
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_the_entrypoint_gives_up_before_the_startup_probe_does(case):
    """So a model that never loads ends with the entrypoint's message, not a bare probe failure."""
    _, objects = case
    container = server_container(objects)
    startup = container["startupProbe"]
    assert int(env_of(container)["READY_TIMEOUT"]) < startup["periodSeconds"] * startup["failureThreshold"]
    grace = server_pod(objects)["spec"]["terminationGracePeriodSeconds"]
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pre_stop + int(env_of(container)["STOP_TIMEOUT"]) < grace


def test_probe_timings_are_values(helm):
    objects = render(
        helm,
        "--set",
        "probes.liveness.periodSeconds=17",
        "--set",
        "probes.startup.failureThreshold=99",
        "--set",
        "preStopSleepSeconds=0",
    )
    container = server_container(objects)
    assert container["livenessProbe"]["periodSeconds"] == 17 and container["startupProbe"]["failureThreshold"] == 99
    assert "lifecycle" not in container


# --- configuration ---------------------------------------------------------------------------------


def checksum(objects: list[dict]) -> str:
    return server_pod(objects)["metadata"]["annotations"]["checksum/config"]


def test_a_config_change_rolls_the_pods_and_nothing_else_does(helm):
    base = render(helm)
    assert checksum(render(helm, "--set", "torchserve.extraProperties.job_queue_size=2000")) != checksum(base)
    assert checksum(render(helm, "--set", "replicaCount=5")) == checksum(base)


def test_the_config_is_the_projects_plus_extra_properties(helm):
    objects = render(helm, "--set", "torchserve.extraProperties.job_queue_size=2000")
    config = next(o for o in objects if o["kind"] == "ConfigMap" and "config.properties" in o["data"])["data"][
        "config.properties"
    ]
    assert config.startswith((ROOT / "handler" / "config.properties").read_text().rstrip("\n"))
    assert config.rstrip().endswith("job_queue_size=2000")


def config_of(objects: list[dict]) -> str:
    return next(o for o in objects if o["kind"] == "ConfigMap" and "config.properties" in o["data"])["data"][
        "config.properties"
    ]


def test_no_page_origin_is_allowed_unless_one_is_set(helm):
    assert "cors_" not in config_of(render(helm))
    origin = "http://127.0.0.1:8088"
    config = config_of(render(helm, "--set", f"torchserve.corsAllowedOrigin={origin}"))
    # The lines `make serve` runs with (handler/server.py), so the page meets the same server in a cluster.
    assert cors_properties(origin).splitlines()[1:] == [
        line for line in config.splitlines() if line.startswith("cors_")
    ]


def test_autoscaling_owns_the_replica_count(helm):
    objects = render(helm, *CASES["eks-gpu"])
    assert "replicas" not in one(objects, "Deployment")["spec"]
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2" and (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 4)
    assert one(render(helm), "Deployment")["spec"]["replicas"] == 2


def test_selectors_pick_the_serving_pods_only(case):
    _, objects = case
    labels = server_pod(objects)["metadata"]["labels"]
    test_labels = one(objects, "Pod")["metadata"]["labels"]
    for obj in objects:
        selector = {
            "Service": lambda o: o["spec"]["selector"],
            "PodDisruptionBudget": lambda o: o["spec"]["selector"]["matchLabels"],
            "NetworkPolicy": lambda o: o["spec"]["podSelector"]["matchLabels"],
            "Deployment": lambda o: o["spec"]["selector"]["matchLabels"],
        }.get(obj["kind"])
        if selector:
            wanted = selector(obj)
            assert wanted.items() <= labels.items() and not wanted.items() <= test_labels.items(), obj["kind"]
    for key in (
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
        "helm.sh/chart",
    ):
        assert all(key in o["metadata"]["labels"] for o in objects), key


# --- the release cycle: canary, Gateway API route, rollout RBAC ------------------------------------------

RELEASE_CYCLE = [
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
    "gatewayAPI.parentRefs[0].namespace=gateways",
    "--set",
    "rollout.rbac.create=true",
]


def by_name(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_the_canary_is_the_stable_pod_on_another_version_behind_the_same_service(helm):
    objects = by_name(render(helm, *RELEASE_CYCLE))
    stable, canary = objects[("Deployment", "mnist-serve")], objects[("Deployment", "mnist-serve-canary")]
    assert canary["spec"]["replicas"] == 1 and stable["spec"]["replicas"] == 2
    stable_pod, canary_pod = stable["spec"]["template"], canary["spec"]["template"]
    assert (
        stable_pod["metadata"]["labels"]["mnist-serve.io/track"] == "stable"
        and canary_pod["metadata"]["labels"]["mnist-serve.io/track"] == "canary"
    )
    versions = [
        {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}["MODEL_VERSION"]
        for pod in (stable_pod, canary_pod)
    ]
    assert versions == ["production", "1"]
    # Apart from the track and the version, the canary's pods are the stable ones.
    for pod in (stable_pod, canary_pod):
        del pod["metadata"]["labels"]["mnist-serve.io/track"]
        pod["spec"]["containers"][0]["env"] = [
            e for e in pod["spec"]["containers"][0]["env"] if e["name"] != "MODEL_VERSION"
        ]
    assert stable_pod == canary_pod
    service = objects[("Service", "mnist-serve")]["spec"]["selector"]
    assert (
        service.items() <= canary_pod["metadata"]["labels"].items()
        and service.items() <= stable_pod["metadata"]["labels"].items()
    )
    assert canary["spec"]["selector"]["matchLabels"]["mnist-serve.io/track"] == "canary"
    for obj in objects.values():
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_the_gateway_api_route_splits_by_weight_between_a_service_per_track(helm):
    objects = by_name(render(helm, *RELEASE_CYCLE, "--set", "gatewayAPI.canaryWeight=25"))
    route = objects[("HTTPRoute", "mnist-serve")]["spec"]
    assert route["parentRefs"] == [{"name": "public", "namespace": "gateways"}]
    backends = route["rules"][0]["backendRefs"]
    assert [(b["name"], b["port"], b["weight"]) for b in backends] == [
        ("mnist-serve-stable", 8080, 75),
        ("mnist-serve-canary", 8080, 25),
    ]
    assert {m["path"]["value"] for m in route["rules"][0]["matches"]} == {
        "/predictions/mnist",
        "/ping",
    }  # never /metrics
    for track in ("stable", "canary"):
        assert objects[("Service", f"mnist-serve-{track}")]["spec"]["selector"]["mnist-serve.io/track"] == track
    alone = by_name(render(helm, "--set", "gatewayAPI.enabled=true", "--set", "gatewayAPI.parentRefs[0].name=public"))
    assert [
        (b["name"], b["weight"]) for b in alone[("HTTPRoute", "mnist-serve")]["spec"]["rules"][0]["backendRefs"]
    ] == [("mnist-serve-stable", 100)]
    assert ("Service", "mnist-serve-canary") not in alone and ("Deployment", "mnist-serve-canary") not in alone


def test_the_rollout_role_allows_what_the_command_does_on_this_release_only(helm):
    objects = by_name(render(helm, *RELEASE_CYCLE))
    rules = objects[("Role", "mnist-serve-rollout")]["rules"]
    assert {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "resourceNames": ["mnist-serve", "mnist-serve-canary"],
        "verbs": ["get", "patch", "delete"],
    } in rules
    assert not any(rule.get("verbs") == ["*"] or "*" in rule.get("resources", []) for rule in rules)
    assert {r for rule in rules for r in rule["resources"]} == {
        "deployments",
        "replicasets",
        "pods",
        "pods/portforward",
    }
    binding = objects[("RoleBinding", "mnist-serve-rollout")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mnist-serve-rollout", "namespace": "serving"}]
    # The serving pods run as another account, bound to nothing.
    assert server_pod(list(objects.values()))["spec"]["serviceAccountName"] == "mnist-serve"
    assert ("Role", "mnist-serve-rollout") not in by_name(render(helm))


def test_network_policy_admits_the_test_pod_when_callers_are_restricted(helm):
    policy = one(render(helm, *CASES["everything"]), "NetworkPolicy")["spec"]
    inference = next(rule for rule in policy["ingress"] if rule["ports"][0]["port"] == "http")
    assert {"namespaceSelector": {"matchLabels": {"name": "ingress"}}} in inference["from"]
    assert any(
        peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "test"
        for peer in inference["from"]
    )
    egress_ports = sorted(p["port"] for rule in policy["egress"] for p in rule["ports"])
    assert egress_ports == [53, 53, 9042, 29042, 29080]


def test_the_helm_test_pod_posts_a_known_digit_with_a_pinned_configurable_image(helm):
    objects = render(helm)
    pod = one(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == server_container(objects)["image"]  # the serving image by default: pinned with it
    assert env_of(container)["PREDICT_URL"] == "http://mnist-serve:8080/predictions/mnist"
    files = next(o for o in objects if o["kind"] == "ConfigMap" and "helm-test.py" in o.get("data", {}))["data"]
    # The digit as the API takes it, the very bytes of samples/digit-7.json, and the 7 it shows.
    assert files["digit-7.json"].strip() == (ROOT / "samples" / "digit-7.json").read_text().strip()
    assert env_of(container)["EXPECTED_DIGIT"] == "7"
    assert "digit" in files["helm-test.py"]
    other = one(
        render(helm, "--set", "tests.image.repository=python", "--set", "tests.image.digest=sha256:" + "a" * 64), "Pod"
    )
    assert other["spec"]["containers"][0]["image"] == "python@sha256:" + "a" * 64


def test_image_digest_pins_the_serving_image(helm):
    digest = "sha256:" + "0123456789abcdef" * 4
    assert server_container(render(helm, "--set", f"image.digest={digest}"))["image"] == f"mnist-serve@{digest}"


def test_a_numbered_model_version_is_served_as_that_version(helm):
    """`--set model.version=3` (a number to helm) means registry version "3", as `mnist-registry publish` numbers
    them."""
    env = {
        item["name"]: item.get("value") for item in server_container(render(helm, "--set", "model.version=3"))["env"]
    }
    assert env["MODEL_VERSION"] == "3"


# --- values refused at install time ----------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, where",
    [
        ("replicaCount=two", "/replicaCount"),
        ("replicaCount=-1", "/replicaCount"),
        ("model.source=s3", "/model/source"),
        ("model.version=../etc", "/model/version"),
        ("model.version=0", "/model/version"),
        ("astra.token=AstraCS:abcdef", "/astra"),
        ("astra.enabled=true", "/astra/tokenSecret/name"),
        ("cassandra.auth.password=s3cret", "/cassandra/auth"),
        ("cassandra.tls.enabled=true", "/cassandra/tls/secretName"),
        ("canary.enabled=true", "/canary/version"),
        ("gatewayAPI.enabled=true", "/gatewayAPI/parentRefs"),
        ("gatewayAPI.canaryWeight=101", "/gatewayAPI/canaryWeight"),
        (
            "torchserve.extraProperties.management_address=http://0.0.0.0:8081",
            "/torchserve/extraProperties/management_address",
        ),
        ("torchserve.extraProperties.enable_model_api=true", "/torchserve/extraProperties/enable_model_api"),
        ("torchserve.corsAllowedOrigin=*", "/torchserve/corsAllowedOrigin"),
        ("torchserve.corsAllowedOrigin=http://127.0.0.1:8088/", "/torchserve/corsAllowedOrigin"),
        ("torchserve.extraProperties.cors_allowed_origin=*", "/torchserve/extraProperties/cors_allowed_origin"),
        ("gpu.count=0", "/gpu/count"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("probes.startup.failureThreshold=0", "/probes/startup/failureThreshold"),
        ("securityContext.allowPrivilegeEscalation=true", "/securityContext/allowPrivilegeEscalation"),
        ("podSecurityContext.runAsNonRoot=false", "/podSecurityContext/runAsNonRoot"),
        ("replicas=3", "additional properties 'replicas' not allowed"),
    ],
)
def test_the_schema_refuses_bad_values_with_its_message(helm, setting, where):
    error = refused(helm, "--set", setting)
    assert "values don't meet the specifications of the schema" in error, error
    assert where in error, error


def test_a_values_file_with_a_plain_text_token_is_refused(helm, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(
        "astra:\n  enabled: true\n  token: AstraCS:secret\n  bundleSecret: {name: b, key: k}\n  tokenSecret: "
        "{name: t, key: k}\n"
    )
    error = refused(helm, "--values", str(values))
    assert "additional properties 'token' not allowed" in error
    assert "AstraCS:secret" not in error  # the message does not repeat the secret


# --- the chart and its files -----------------------------------------------------------------------


def test_app_version_is_the_projects_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == project
    kind_tag = yaml.safe_load((CHART / "values-kind.yaml").read_text())["image"]["tag"]
    assert kind_tag == f"{project}-cpu-model"  # what docker/build.sh cpu --with-model tags


# Blocks handed to Kubernetes as they are, documented by the comment above their key.
PASS_THROUGH = {
    "podSecurityContext",
    "securityContext",
    "updateStrategy",
    "nodeSelector",
    "tolerations",
    "topologySpreadConstraints",
}


@pytest.mark.parametrize("name", ["values.yaml", "values-kind.yaml", "values-eks-gpu.yaml"])
def test_every_value_has_a_comment(name):
    missing = values_without_a_comment(CHART / name, PASS_THROUGH)
    assert not missing, f"{name}: values without a comment above them:\n" + "\n".join(missing)
