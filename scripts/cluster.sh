#!/usr/bin/env bash
# A local Kubernetes cluster for mnist-serve: a real control plane (etcd,
# kube-apiserver, controller-manager, scheduler) run by kwokctl from the binaries
# install-k8s-tools.sh builds, plus kwok-simulated EKS-like nodes
# (k8s/kwok/nodes.yaml). No Docker, no downloads.
#
#   scripts/cluster.sh up       create or restart the cluster, wait for its nodes
#   scripts/cluster.sh down     delete it
#   scripts/cluster.sh status   exit 0 only when it answers
#
# Afterwards: kubectl --kubeconfig "${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}/kubeconfig" ...
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=SCRIPTDIR/versions.env
source "$ROOT/scripts/versions.env"

CACHE="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}"
BIN="$CACHE/bin"
NAME=mnist-serve
KUBECONFIG_FILE="$CACHE/kubeconfig"

# kwokctl keeps clusters, logs and its own config under its workdir (default
# ~/.kwok); keep all of it in the cache.
export KWOK_WORKDIR="$CACHE/kwok"
export KWOK_KUBE_VERSION="$KUBE_VERSION"
CLUSTER_DIR="$KWOK_WORKDIR/clusters/$NAME"
# kwokctl copies the binaries into the cluster at creation; this records which.
VERSIONS="kube=$KUBE_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION"
VERSIONS_FILE="$CLUSTER_DIR/mnist-serve.versions"

# kwokctl's default for each binary is a release download this machine cannot
# reach. Flags rather than KWOK_*_BINARY variables: a mistyped flag fails, while
# a mistyped variable is ignored and kwokctl quietly tries to download.
CREATE_FLAGS=(
  --runtime=binary
  --etcd-binary="$BIN/etcd"
  --kube-apiserver-binary="$BIN/kube-apiserver"
  --kube-controller-manager-binary="$BIN/kube-controller-manager"
  --kube-scheduler-binary="$BIN/kube-scheduler"
  --kwok-controller-binary="$BIN/kwok"
  # Write our own kubeconfig and leave ~/.kube/config alone.
  --kubeconfig="$KUBECONFIG_FILE"
  --wait=2m
)
# The kubectl built with the control plane (install-k8s-tools.sh), of the API server's own version.
export KWOK_KUBECTL_BINARY="$BIN/kubectl"

kwokctl() { "$BIN/kwokctl" --name="$NAME" --config="$ROOT/k8s/kwok/kwokctl.yaml" "$@"; }
k() { "$BIN/kubectl" --kubeconfig="$KUBECONFIG_FILE" "$@"; }
exists() { [[ -x "$BIN/kwokctl" ]] && "$BIN/kwokctl" get clusters 2>/dev/null | grep -x "$NAME" >/dev/null; }
answers() { k get --raw=/readyz >/dev/null 2>&1; }

# kwokctl trusts its pid files: an unreaped zombie, or after a reboot a pid now
# used by an unrelated process, counts as "running", so `start` skips that
# component and `stop`/`delete` would signal a stranger. Forget such pids.
forget_stale_pids() {
  local f pid exe want
  for f in "$CLUSTER_DIR"/pids/*.pid; do
    [[ -e "$f" ]] || continue
    pid="$(<"$f")"
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || exe=""
    want="$(readlink -f "$CLUSTER_DIR/bin/$(basename "$f" .pid)")"
    # "(deleted)": the binary was rebuilt while the process ran; still ours.
    [[ "$exe" == "$want" || "$exe" == "$want (deleted)" ]] || rm -f "$f"
  done
}

up() {
  local start=$SECONDS
  "$ROOT/scripts/install-k8s-tools.sh"
  if exists && [[ "$(cat "$VERSIONS_FILE" 2>/dev/null)" != "$VERSIONS" ]]; then
    echo "cluster $NAME was made with other versions; recreating it"
    down
  fi
  if ! exists; then
    kwokctl create cluster "${CREATE_FLAGS[@]}"
    echo "$VERSIONS" >"$VERSIONS_FILE"
  elif ! answers; then
    # Created earlier but its processes are gone (e.g. after a reboot).
    forget_stale_pids
    kwokctl start cluster --wait=2m
  fi
  # apply is idempotent; on an existing node it leaves status (kwok's) untouched.
  k apply --filename="$ROOT/k8s/kwok/nodes.yaml"
  k wait --for=condition=Ready node --selector=type=kwok --timeout=2m
  k get nodes --output=wide
  echo "cluster $NAME up in $((SECONDS - start))s; kubeconfig: $KUBECONFIG_FILE"
}

down() {
  if exists; then
    forget_stale_pids
    kwokctl delete cluster --kubeconfig="$KUBECONFIG_FILE"
  fi
  rm -f "$KUBECONFIG_FILE"
  echo "cluster $NAME deleted"
}

status() {
  if ! exists; then
    echo "cluster $NAME: absent"
    return 1
  fi
  if ! answers; then
    echo "cluster $NAME: created but not answering (run: $0 up)"
    return 1
  fi
  echo "cluster $NAME: running; kubeconfig: $KUBECONFIG_FILE"
  k get nodes
}

case "${1:-}" in
  up | down | status) "$1" ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
