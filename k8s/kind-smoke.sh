#!/usr/bin/env bash
# The chart on a real cluster: a kind cluster (k8s/kind-cluster.yaml) on the node image of
# k8s/kind/node-image.sh with the CPU image with the model built in preloaded (k8s/kind/preload.sh),
# `helm install` with values-kind.yaml, and on real pods:
#   - real digits in every input form through a port-forward, and `helm test`;
#   - the serving container runs as uid 1000 on a read-only root filesystem;
#   - the NetworkPolicy: a pod outside the allowed selector is blocked, one inside is not;
#   - the registry path: pods fetch the production alias, then version 2, from the local Cassandra node;
#   - zero downtime: while k8s/kind/load.py posts digits through the Service from inside the cluster,
#     helm upgrade to the registry, to version 2, and a config change: every request counted;
#   - a serving container killed: failures and seconds until it serves again;
#   - bad values refused, and a pod that cannot reach its registry says so in its status.
# Then the cluster is deleted. Each phase prints its time.
#
#   k8s/kind-smoke.sh            (make kind-smoke; needs artifacts/model-store/mnist.mar: make archive)
#   MODEL_ARCHIVE=X.mar MODEL_METRICS=metrics.json k8s/kind-smoke.sh     (another model; the tests' own)
#   KIND_SMOKE_KEEP=1 k8s/kind-smoke.sh     (a failed run leaves its cluster up to look at)
#
# Starts a Docker engine where none runs (scripts/docker-engine.sh) and builds kind, kubectl and helm
# (scripts/install-k8s-tools.sh). It only ever deletes the cluster it created itself, named below.
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}"
BIN="$CACHE/bin"
CHART="$ROOT/charts/mnist-serve"
CLUSTER=mnist-serve-smoke  # as in k8s/kind-cluster.yaml
NODE="$CLUSTER-control-plane"
# The node container this script created last; a cluster of this name that is not it is someone else's.
OWNED="$CACHE/kind-smoke.node-id"
NAMESPACE=mnist-serve
RELEASE=mnist-serve
# The registry the pods read, a keyspace of the local node of its own (dropped and made anew each run).
KEYSPACE=mnist_kind_smoke
PY="$ROOT/.venv/bin/python"
# The model built into the image and published to the registry (twice: versions 1 and 2), with its metrics.
export MODEL_ARCHIVE="${MODEL_ARCHIVE:-$ROOT/artifacts/model-store/mnist.mar}"
METRICS="${MODEL_METRICS:-$ROOT/artifacts/metrics.json}"
SOCAT="socat=1.7.4.4-2"

fail() { echo "error: $*" >&2; exit 1; }
"$ROOT/scripts/docker-engine.sh"
[[ -f "$MODEL_ARCHIVE" ]] || fail "no $MODEL_ARCHIVE; run make archive"
[[ -f "$METRICS" ]] || fail "no $METRICS (the archive's metrics, published with it); run make train archive"
[[ -x "$PY" ]] || fail "no $PY; run make venv"

timings=()
phase_name="" phase_start=$SECONDS
phase() { # phase NAME: close the last phase (its time) and start the next
  [[ -z "$phase_name" ]] || timings+=("$(printf '%5d s  %s' $((SECONDS - phase_start)) "$phase_name")")
  phase_name="$1" phase_start=$SECONDS
  [[ -z "$1" ]] || echo "== $1"
}

phase "tools: kind, kubectl, helm (built once from Go modules)"
"$ROOT/scripts/install-k8s-tools.sh" kind kube helm
KIND="$BIN/kind" HELM="$BIN/helm" KUBECTL="$BIN/kubectl"

phase "node image"
node_image="$("$ROOT/k8s/kind/node-image.sh" | tail -n 1)"
echo "node image: $node_image"

work="$(mktemp -d)"
export KUBECONFIG="$work/kubeconfig"  # this cluster only; ~/.kube/config is left alone
background=() created=""
cleanup() {
  local pid
  for pid in "${background[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [[ -n "$created" && -n "${KIND_SMOKE_KEEP:-}" ]]; then
    echo "kept the cluster for a look (KIND_SMOKE_KEEP): KUBECONFIG=$CACHE/kind-smoke.kubeconfig; the next run deletes it" >&2
    cp "$KUBECONFIG" "$CACHE/kind-smoke.kubeconfig"
  elif [[ -n "$created" ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -f "$OWNED"
  fi
  rm -rf "$work"
}
trap cleanup EXIT

phase "serving image with the model"
tag="$("$ROOT/docker/build.sh" cpu --with-model 2>"$work/image-build.log" | tail -n 1)" \
  || { tail -n 30 "$work/image-build.log" >&2; fail "docker/build.sh cpu --with-model failed"; }
echo "serving image: $tag"

phase "the serving image preloaded into the node image (k8s/kind/preload.sh: once per serving image)"
node_image="$("$ROOT/k8s/kind/preload.sh" "$node_image" "$tag" | tail -n 1)"
echo "node image with the serving image: $node_image"
# Where Docker keeps its data, the cluster's node gets a copy of the preloaded containerd, the serving image
# unpacked, and ~2.5 GB of control plane images, etcd and logs (its volume: 12.9 GB for the 5.3 GB image).
size="$(docker image inspect --format '{{.Size}}' "$tag")"
free="$(df --output=avail -B1 "$(docker info --format '{{.DockerRootDir}}')" | tail -n 1)"
((free > 2 * size + 4 * 1024 ** 3)) || fail "the cluster's node with $tag needs $(((2 * size) / 1024 ** 3 + 4)) GiB free where Docker keeps its data; $((free / 1024 ** 3)) GiB are (docker system df; docker builder prune frees the build cache)"

k() { "$KUBECTL" --namespace "$NAMESPACE" "$@"; }
# helm without its warning that the chart's config.properties is a link (to handler/config.properties, on purpose).
helm() { "$HELM" "$@" 2> >(grep -v 'found symbolic link in path' >&2); }
SERVERS="app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=server"
in_cluster() { # in_cluster NAME LABELS PYTHON: run PYTHON in a pod of the serving image; print its output
  k run "$1" --image="$tag" --image-pull-policy=Never --restart=Never --labels="$2" --command -- python3 -c "$3" >/dev/null
  if ! k wait --for=jsonpath='{.status.phase}'=Succeeded "pod/$1" --timeout 2m >/dev/null; then
    k logs "$1" >&2
    fail "pod $1 did not succeed"
  fi
  k logs "$1"
}
load_pod() { # load_pod NAME [ARGUMENT...]: k8s/kind/load.py (ConfigMap smoke-load) in a pod the NetworkPolicy allows
  local extra=""
  (($# < 2)) || extra="$(printf ', %s' "${@:2}")"
  k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  labels: {mnist-serve-client: allowed}
spec:
  restartPolicy: Never
  containers:
    - name: load
      image: $tag
      imagePullPolicy: Never
      command: [python3, /load/load.py, --url, "http://$RELEASE:8080/predictions/mnist", --digit, /load/test-digit.json$extra]
      volumeMounts: [{name: load, mountPath: /load}]
  volumes: [{name: load, configMap: {name: smoke-load}}]
EOF
}
# ping_for SECONDS: Python that asks the Service's /ping until it answers or SECONDS have passed:
# kube-router admits a new pod's address within seconds, so one refusal is not yet a verdict.
ping_for() { echo "
import time, urllib.request
deadline = time.monotonic() + $1
while True:
    try:
        urllib.request.urlopen('http://$RELEASE:8080/ping', timeout=3)
        print('reached')
        break
    except OSError as error:
        if time.monotonic() > deadline:
            print('blocked:', error)
            break
        time.sleep(1)"; }

phase "host accommodations"
kind_path="$PATH" applied=()
if ! probe="$(docker run --rm --privileged --entrypoint true "$node_image" 2>&1)"; then
  [[ "$probe" == *"apply caps"* ]] || fail "a privileged container cannot start here, for a reason this script does not know: $probe"
  kind_path="$ROOT/k8s/kind/unprivileged:$PATH"
  missing=""
  (((16#$(awk '/^CapBnd:/ { print $2 }' /proc/self/status) >> 24 & 1) == 1)) || missing=" (CAP_SYS_RESOURCE is missing from this host's capability bounding set)"
  applied+=("no privileged containers$missing: kind's nodes get every capability but SYS_RESOURCE (k8s/kind/unprivileged/docker)")
fi
cp "$ROOT/k8s/kind-cluster.yaml" "$work/kind-cluster.yaml"
if [[ "$(docker info --format '{{.CgroupVersion}}')" == 1 ]]; then
  cat >>"$work/kind-cluster.yaml" <<'EOF'
# Added by k8s/kind-smoke.sh: this Docker engine runs cgroup v1, which kubelet 1.35+ refuses by default.
kubeadmConfigPatches:
  - |
    kind: KubeletConfiguration
    failCgroupV1: false
EOF
  applied+=("cgroup v1: kubelet's failCgroupV1 set to false")
fi
if ((${#applied[@]})); then
  echo "host accommodations: $(printf '%s; ' "${applied[@]}" | sed 's/; $//')"
else
  echo "host accommodations: none (privileged containers and cgroup v2 here)"
fi
kind() { PATH="$kind_path" "$KIND" "$@"; }

phase "kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -x "$CLUSTER" >/dev/null; then
  [[ -f "$OWNED" && "$(docker inspect --format '{{.Id}}' "$NODE" 2>/dev/null)" == "$(cat "$OWNED")" ]] \
    || fail "a kind cluster named $CLUSTER exists that this script did not create; delete it (kind delete cluster --name $CLUSTER) or keep it and skip the smoke test"
  echo "deleting the cluster an interrupted run left"
  kind delete cluster --name "$CLUSTER"
fi
created=yes
kind create cluster --config "$work/kind-cluster.yaml" --image "$node_image" --wait 3m &
creating=$!
background+=("$creating")
# Meanwhile the node's containerd unpacks the preloaded serving image, which the first pod would do at
# helm install (~30 s of one core, as the control plane starts on the other).
until docker exec "$NODE" ctr --namespace k8s.io version >/dev/null 2>&1; do
  kill -0 "$creating" 2>/dev/null || break
  sleep 1
done
reference=$tag  # as containerd names it: Docker's short names are docker.io's
[[ "$reference" == */* ]] || reference="library/$reference"
[[ "${reference%%/*}" == *[.:]* || "${reference%%/*}" == localhost ]] || reference="docker.io/$reference"
docker exec "$NODE" sh -c "mkdir -p /tmp/unpack && ctr --namespace k8s.io images mount '$reference' /tmp/unpack >/dev/null && ctr --namespace k8s.io images unmount --rm /tmp/unpack >/dev/null" \
  || echo "note: the node did not unpack $reference ahead; the first pod will" >&2
wait "$creating"
# Whose it is, for the next run should this one be interrupted.
docker inspect --format '{{.Id}}' "$NODE" >"$OWNED"
if "$KUBECTL" --namespace kube-system get daemonset kube-router >/dev/null 2>&1; then
  "$KUBECTL" --namespace kube-system rollout status daemonset/kube-router --timeout 2m
fi
"$KUBECTL" --namespace kube-system rollout status deployment/coredns --timeout 3m

phase "helm install $RELEASE ($tag)"
# Two pods (zero downtime needs a second), and only pods labelled mnist-serve-client=allowed may call them.
# A quarter CPU each: on a 2-core node the control plane reserves 0.85, and a rollout surges a third pod.
cat >"$work/smoke-values.yaml" <<'EOF'
replicaCount: 2
resources:
  requests:
    cpu: 250m
networkPolicy:
  inferenceFrom:
    - podSelector:
        matchLabels:
          mnist-serve-client: allowed
EOF
values=(--values "$CHART/values-kind.yaml" --values "$work/smoke-values.yaml" --set image.tag="${tag#*:}")
helm install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --create-namespace "${values[@]}" --wait --timeout 10m
k rollout status "deployment/$RELEASE" --timeout 5m

phase "digits through a port-forward"
local_port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
k port-forward "service/$RELEASE" "$local_port:8080" >"$work/port-forward.log" 2>&1 &
background+=($!)
(cd "$ROOT" && "$PY" k8s/kind/digits.py "http://127.0.0.1:$local_port/predictions/mnist")

phase "malformed bodies through the Service, then a digit"
k create configmap smoke-load --from-file="$ROOT/k8s/kind/load.py" --from-file="$CHART/files/test-digit.json" >/dev/null
load_pod bad-bodies --bad-bodies
k wait --for=jsonpath='{.status.phase}'=Succeeded pod/bad-bodies --timeout 2m >/dev/null || { k logs bad-bodies >&2; fail "malformed bodies were not refused as they should be"; }
k logs bad-bodies

phase "helm test"
helm test "$RELEASE" --namespace "$NAMESPACE" --logs --timeout 5m

phase "inside the serving container"
pod="$(k get pods -l "$SERVERS" -o jsonpath='{.items[0].metadata.name}')"
uid="$(k exec "$pod" -c torchserve -- id -u)"
[[ "$uid" == 1000 ]] || fail "the serving container runs as uid $uid, not 1000"
if written="$(k exec "$pod" -c torchserve -- touch /probe 2>&1)"; then fail "the serving container could write its root filesystem"; fi
[[ "$written" == *"Read-only file system"* ]] || fail "touch /probe failed, but not for a read-only root filesystem: $written"
echo "ok: uid $uid; touch /probe: Read-only file system"

phase "NetworkPolicy"
# Both at once; the one to be blocked tries for 10 s, the allowed one may take up to 20.
in_cluster probe-allowed mnist-serve-client=allowed "$(ping_for 20)" >"$work/allowed" &
allowed_probe=$!
in_cluster probe-outside mnist-serve-client=other "$(ping_for 10)" >"$work/outside"
wait "$allowed_probe"
allowed="$(cat "$work/allowed")" outside="$(cat "$work/outside")"
echo "a pod with mnist-serve-client=allowed: $allowed; one without: $outside"
[[ "$allowed" == reached ]] || fail "the NetworkPolicy blocked a pod it allows"
[[ "$outside" == blocked* ]] || fail "the NetworkPolicy let through a pod outside its selector"

phase "registry: two versions in the local Cassandra node"
"$ROOT/scripts/cassandra.sh" up
(cd "$ROOT" && "$PY" -c "
from cassandra.cluster import Cluster
from registry.settings import cassandra_settings
from registry.db import cluster_kwargs
cluster = Cluster(**cluster_kwargs(cassandra_settings()))
cluster.connect().execute('DROP KEYSPACE IF EXISTS $KEYSPACE')
cluster.shutdown()")
for _ in 1 2; do CASSANDRA_KEYSPACE=$KEYSPACE "$ROOT/.venv/bin/mnist-registry" publish "$MODEL_ARCHIVE" --metrics "$METRICS"; done
CASSANDRA_KEYSPACE=$KEYSPACE "$ROOT/.venv/bin/mnist-registry" promote 1 --alias production
# The node listens on loopback; the pods reach this host at the kind network's gateway, where socat
# forwards to it. Nothing outside this machine reaches that address.
gateway="$(docker network inspect kind --format '{{range .IPAM.Config}}{{.Gateway}} {{end}}' | tr ' ' '\n' | awk '/\./ && !found { print; found = 1 }')"
"$ROOT/scripts/apt-install.sh" socat "$SOCAT"
socat "TCP-LISTEN:9042,bind=$gateway,fork,reuseaddr" TCP:127.0.0.1:9042 &
background+=($!)
echo "the pods' registry: $gateway:9042 (socat to the local node), keyspace $KEYSPACE"
registry=(--set model.source=registry --set "cassandra.hosts[0]=$gateway" --set cassandra.keyspace=$KEYSPACE)

phase "zero-downtime upgrades under load"
start_load() { # start_load NAME: k8s/kind/load.py's load loop in a pod, counting once it has a right answer
  load_pod "$1"
  k wait --for=condition=Ready "pod/$1" --timeout 2m >/dev/null
  until k logs "$1" | grep "^counting" >/dev/null; do
    [[ "$(k get pod "$1" -o jsonpath='{.status.phase}')" == Running ]] || { k logs "$1" >&2; fail "the load pod $1 stopped"; }
    sleep 1
  done
}
stop_load() { # stop_load NAME: its summary line (JSON)
  k exec "$1" -- touch /tmp/stop
  k wait --for=jsonpath='{.status.phase}'=Succeeded "pod/$1" --timeout 1m >/dev/null
  k logs "$1" | tail -n 1
}
upgrade() { # upgrade WHAT HELM-ARGS...: helm upgrade and wait; prints its seconds
  local what=$1 began=$SECONDS
  shift
  helm upgrade "$RELEASE" "$CHART" --namespace "$NAMESPACE" "${values[@]}" "$@" --wait --timeout 10m >/dev/null
  echo "  $what: rolled out in $((SECONDS - began)) s"
}
start_load load-upgrade
upgrade "model from the image -> the registry's production alias (version 1)" "${registry[@]}"
upgrade "registry version 1 -> 2" "${registry[@]}" --set model.version=2
upgrade "a config change (torchserve.extraProperties)" "${registry[@]}" --set model.version=2 \
  --set torchserve.extraProperties.default_response_timeout=60
upgrades="$(stop_load load-upgrade)"
for pod in $(k get pods -l "$SERVERS" -o name); do
  k logs "$pod" -c torchserve | grep -m1 -i "version" || true
done
echo "under load through the Service, 2 connections: $upgrades  (target: 0 failed, 0 dropped)"
read -r failed dropped < <("$PY" -c 'import json, sys; s = json.loads(sys.argv[1]); print(s["failed"], s["dropped"])' "$upgrades")
((failed == 0 && dropped == 0)) || fail "requests failed during the upgrades: $upgrades"

phase "release cycle: the rollout's own account"
# What a CI job or an in-cluster runner would have: the chart's rollout ServiceAccount and Role, nothing more.
upgrade "the chart's rollout RBAC" "${registry[@]}" --set model.version=2 \
  --set torchserve.extraProperties.default_response_timeout=60 --set rollout.rbac.create=true
"$KUBECTL" auth can-i patch "deployment/$RELEASE" --namespace "$NAMESPACE" --as "system:serviceaccount:$NAMESPACE:$RELEASE-rollout" >/dev/null \
  || fail "the rollout account may not patch deployment/$RELEASE"
if "$KUBECTL" auth can-i patch "deployment/$RELEASE" --namespace "$NAMESPACE" --as "system:serviceaccount:$NAMESPACE:$RELEASE" >/dev/null; then
  fail "the serving pods' own account may patch deployment/$RELEASE"
fi
# A kubeconfig with the account's token, written by the shell itself (no command line ever holds the token).
token="$(k create token "$RELEASE-rollout" --duration 1h)"
server="$("$KUBECTL" config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
authority="$("$KUBECTL" config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
cat >"$work/rollout.kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters: [{name: kind, cluster: {server: "$server", certificate-authority-data: "$authority"}}]
users: [{name: rollout, user: {token: "$token"}}]
contexts: [{name: rollout, context: {cluster: kind, user: rollout, namespace: $NAMESPACE}}]
current-context: rollout
KUBECONFIG
unset token
echo "ok: $RELEASE-rollout may patch deployment/$RELEASE; the serving pods' account ($RELEASE) may not"
# mnist-registry as the rollout job runs it: the registry's keyspace, the cluster as the rollout account.
registry_as_rollout() { CASSANDRA_KEYSPACE=$KEYSPACE KUBECONFIG="$work/rollout.kubeconfig" "$ROOT/.venv/bin/mnist-registry" "$@"; }
pinned() { k get "deployment/$1" -o jsonpath='{.spec.template.spec.containers[0].env[?(@.name=="MODEL_VERSION")].value}'; }
summary_field() { "$PY" -c 'import json, sys; s = json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, s))' "$1" "$2"; }

phase "roll out: production -> 1, then -> 2 under load (mnist-registry promote --rollout)"
start_load load-rollout
for version in 1 2; do
  began=$SECONDS
  registry_as_rollout promote "$version" --alias production --rollout "deployment/$RELEASE" --timeout 300
  echo "  rolled out version $version in $((SECONDS - began)) s"
done
rolled="$(stop_load load-rollout)"
echo "rollouts under load through the Service: $rolled  (target: every answer from version 1 or 2, 0 failed, 0 dropped)"
[[ "$(summary_field "$rolled" 'failed + dropped')" == 0 ]] || fail "requests failed during the rollouts: $rolled"
[[ "$(summary_field "$rolled" '" ".join(sorted(versions))')" == "1 2" ]] || fail "the answers did not come from versions 1 and 2: $rolled"
[[ "$(pinned "$RELEASE")" == 2 ]] || fail "deployment/$RELEASE is pinned to $(pinned "$RELEASE"), not 2"

phase "roll out a version that does not load: rolled back"
# The archive with its model.pt replaced by bytes that are no model: a valid zip, refused by torch.jit.load.
"$PY" -c 'import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as good, zipfile.ZipFile(sys.argv[2], "w") as bad:
    for item in good.infolist():
        bad.writestr(item, b"not a TorchScript model" if item.filename == "model.pt" else good.read(item))' "$MODEL_ARCHIVE" "$work/no-model.mar"
CASSANDRA_KEYSPACE=$KEYSPACE "$ROOT/.venv/bin/mnist-registry" publish "$work/no-model.mar" --metrics "$METRICS" --version 3
start_load load-bad
began=$SECONDS
if registry_as_rollout promote 3 --alias production --rollout "deployment/$RELEASE" --timeout 300 >"$work/bad-rollout.log" 2>&1; then
  cat "$work/bad-rollout.log"
  fail "the rollout of a version that does not load succeeded"
fi
cat "$work/bad-rollout.log"
bad_run="$(stop_load load-bad)"
echo "rolled back in $((SECONDS - began)) s; meanwhile through the Service: $bad_run  (target: 0 failed, 0 dropped)"
grep -q "^error: version 3 failed (.*does not load.*); rolled back: deployment/$RELEASE in $NAMESPACE and alias production are on version 2 again$" \
  "$work/bad-rollout.log" || fail "the failed rollout did not end with its one-line reason"
[[ "$(pinned "$RELEASE")" == 2 ]] || fail "deployment/$RELEASE is pinned to $(pinned "$RELEASE") after the rollback, not 2"
# (grep without -q: it reads to the end, so the command never writes into a closed pipe)
CASSANDRA_KEYSPACE=$KEYSPACE "$ROOT/.venv/bin/mnist-registry" show production | grep -E '^version: +2$' >/dev/null || fail "production is not back on version 2"

phase "canary: version 1 beside 2, then abort (mnist-registry canary)"
start_load load-canary
registry_as_rollout canary start 1 --deployment "deployment/$RELEASE" --replicas 1 --timeout 300
sleep 10  # of load beside the canary: a few thousand requests
registry_as_rollout canary status --deployment "deployment/$RELEASE"
canary_run="$(stop_load load-canary)"
echo "with the canary, through the Service: $canary_run  (1 pod of 3: about a third from version 1)"
[[ "$(summary_field "$canary_run" '" ".join(sorted(versions))')" == "1 2" ]] || fail "the answers did not come from versions 1 and 2: $canary_run"
[[ "$(summary_field "$canary_run" '0.1 <= versions["1"] / sum(versions.values()) <= 0.6')" == True ]] \
  || fail "the canary's share of the answers is far from its third of the pods: $canary_run"
[[ "$(summary_field "$canary_run" 'failed + dropped')" == 0 ]] || fail "requests failed with the canary: $canary_run"
registry_as_rollout canary abort --deployment "deployment/$RELEASE"
left="$(k get pods -l "$SERVERS" -o jsonpath='{range .items[*]}{.spec.containers[0].env[?(@.name=="MODEL_VERSION")].value} {end}')"
[[ "$left" == "2 2 " ]] || fail "after the abort the serving pods are on versions '$left', not 2 and 2"
echo "ok: after the abort only version 2 serves ($left)"

phase "a serving container killed"
start_load load-kill
pod="$(k get pods -l "$SERVERS" -o jsonpath='{.items[0].metadata.name}')"
container="$(k get pod "$pod" -o jsonpath='{.status.containerStatuses[0].containerID}')"
restarts="$(k get pod "$pod" -o jsonpath='{.status.containerStatuses[0].restartCount}')"
killed=$SECONDS
docker exec "$NODE" ctr --namespace k8s.io tasks kill --signal SIGKILL "${container#containerd://}"
until [[ "$(k get pod "$pod" -o jsonpath='{.status.containerStatuses[0].restartCount} {.status.containerStatuses[0].ready}')" == "$((restarts + 1)) true" ]]; do
  ((SECONDS - killed < 300)) || fail "pod $pod did not serve again within 300 s of its container's kill"
  sleep 1
done
back=$((SECONDS - killed))
sleep 5
after_kill="$(stop_load load-kill)"
echo "SIGKILL to $pod's container: ready again after $back s; meanwhile through the Service: $after_kill"

phase "bad input: a wrong value is refused at install time"
if helm install bad "$CHART" --namespace "$NAMESPACE" --set model.source=s3 2>"$work/bad.log"; then
  fail "helm installed model.source=s3"
fi
grep -q "at '/model/source'" "$work/bad.log" || { cat "$work/bad.log" >&2; exit 1; }
echo "ok: $(grep -m1 "at '/model/source'" "$work/bad.log")"

phase "bad input: a pod that cannot reach its registry says so in its status"
helm install unreachable "$CHART" --namespace "$NAMESPACE" --values "$CHART/values-kind.yaml" --set replicaCount=1 \
  --set image.tag="${tag#*:}" --set model.source=registry --set "cassandra.hosts[0]=127.0.0.1" --set cassandra.connectTimeoutSeconds=2
message=""
for _ in $(seq 1 60); do
  message="$(k get pods -l app.kubernetes.io/instance=unreachable \
    -o jsonpath='{.items[0].status.containerStatuses[0].lastState.terminated.message}' 2>/dev/null || true)"
  [[ -z "$message" ]] || break
  sleep 3
done
echo "termination message: $message"
[[ "$message" == *"cannot reach the model registry"* ]] || fail "expected the registry failure in the pod's status"

phase "delete the cluster"
kind delete cluster --name "$CLUSTER"
rm -f "$OWNED"
created=""
phase ""
echo "phase times:"
printf '%s\n' "${timings[@]}"
echo "kind smoke test passed"
