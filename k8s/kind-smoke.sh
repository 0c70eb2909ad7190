#!/usr/bin/env bash
# The chart on a real cluster: create a kind cluster (k8s/kind-cluster.yaml), build the CPU image with
# the model inside, load it into the node, `helm install` with values-kind.yaml, wait for the rollout,
# post a real digit through a port-forward and check the answer, run `helm test`, check that a pod
# which cannot get its model says why in its status, and delete the cluster.
#
#   k8s/kind-smoke.sh            (make kind-smoke; needs artifacts/model-store/mnist.mar: make archive)
#
# Needs a running Docker engine, kind and kubectl; without them it stops at once and says what is
# missing. (tests/test_chart.py checks the chart where they are not.)
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}"
HELM="$CACHE/bin/helm"
CHART="$ROOT/charts/mnist-serve"
CLUSTER=mnist-serve-smoke  # as in k8s/kind-cluster.yaml
NAMESPACE=mnist-serve
RELEASE=mnist-serve
# shellcheck source=../scripts/versions.env
source "$ROOT/scripts/versions.env"  # KIND_VERSION
PY="$ROOT/.venv/bin/python"

KIND="$(command -v kind || echo "$CACHE/bin/kind")"
missing=()
docker info >/dev/null 2>&1 || missing+=("a running Docker engine ('docker info' fails)")
[[ -x "$KIND" ]] || missing+=("kind (GOBIN=$CACHE/bin go install sigs.k8s.io/kind@$KIND_VERSION)")
command -v kubectl >/dev/null || missing+=("kubectl")
if ((${#missing[@]})); then
  needs="$(printf '%s, ' "${missing[@]}")"
  echo "error: the kind smoke test needs ${needs%, }; it cannot run here" >&2
  exit 1
fi
[[ -f "$ROOT/artifacts/model-store/mnist.mar" ]] || { echo "error: no artifacts/model-store/mnist.mar; run make archive" >&2; exit 1; }
[[ -x "$PY" ]] || { echo "error: no $PY; run make venv" >&2; exit 1; }
"$ROOT/scripts/install-k8s-tools.sh" helm
# Another kind release brings another node image (Kubernetes version); it likely works, but say so.
"$KIND" version | grep -q "$KIND_VERSION" || echo "warning: written for kind $KIND_VERSION, found: $("$KIND" version)" >&2

work="$(mktemp -d)"
export KUBECONFIG="$work/kubeconfig"  # this cluster only; ~/.kube/config is left alone
port_forward=""
cleanup() {
  [[ -z "$port_forward" ]] || kill "$port_forward" 2>/dev/null || true
  "$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
k() { kubectl --namespace "$NAMESPACE" "$@"; }
step() { echo "== $*"; }

step "building the CPU image with the model"
tag="$("$ROOT/docker/build.sh" cpu --with-model | tail -n 1)"

step "creating kind cluster $CLUSTER"
"$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true  # a leftover of an interrupted run
"$KIND" create cluster --config "$ROOT/k8s/kind-cluster.yaml" --wait 3m
"$KIND" load docker-image "$tag" --name "$CLUSTER"

step "helm install $RELEASE ($tag)"
"$HELM" install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --create-namespace \
  --values "$CHART/values-kind.yaml" --set image.tag="${tag#*:}" --wait --timeout 10m
k rollout status "deployment/$RELEASE" --timeout 5m

step "a digit through a port-forward"
local_port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
k port-forward "service/$RELEASE" "$local_port:8080" >"$work/port-forward.log" 2>&1 &
port_forward=$!
# The helm test's own script, here against the port-forward (it retries while that starts).
PREDICT_URL="http://127.0.0.1:$local_port/predictions/mnist" DIGIT_FILE="$CHART/files/test-digit.json" \
  "$PY" "$CHART/files/helm-test.py"

step "helm test"
"$HELM" test "$RELEASE" --namespace "$NAMESPACE" --logs --timeout 5m

step "bad input: a wrong value is refused at install time"
if "$HELM" install bad "$CHART" --namespace "$NAMESPACE" --set model.source=s3 2>"$work/bad.log"; then
  echo "error: helm installed model.source=s3" >&2; exit 1
fi
grep -q "at '/model/source'" "$work/bad.log" || { cat "$work/bad.log" >&2; exit 1; }

step "bad input: a pod that cannot reach its registry says so in its status"
"$HELM" install unreachable "$CHART" --namespace "$NAMESPACE" --values "$CHART/values-kind.yaml" \
  --set image.tag="${tag#*:}" --set model.source=registry --set cassandra.hosts[0]=127.0.0.1 --set cassandra.connectTimeoutSeconds=2
message=""
for _ in $(seq 1 60); do
  message="$(k get pods -l app.kubernetes.io/instance=unreachable \
    -o jsonpath='{.items[0].status.containerStatuses[0].lastState.terminated.message}' 2>/dev/null || true)"
  [[ -z "$message" ]] || break
  sleep 3
done
echo "termination message: $message"
[[ "$message" == *"cannot reach the model registry"* ]] || { echo "error: expected the registry failure in the pod's status" >&2; exit 1; }

echo "kind smoke test passed"
