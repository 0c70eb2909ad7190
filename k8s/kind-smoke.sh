#!/usr/bin/env bash
# The chart on a real cluster: a kind cluster (k8s/kind-cluster.yaml) on the node image of
# k8s/kind/node-image.sh with the CPU image with the model built in, and the CPU training image, preloaded
# (k8s/kind/preload.sh), `helm install` with values-kind.yaml, and on real pods:
#   - real digits in every input form through a port-forward, and `helm test`;
#   - floods of uploads and slow uploads through the Service (bench/flood.py), beside real digits: no restart;
#   - the serving container runs as uid 1000 on a read-only root filesystem;
#   - the NetworkPolicy: a pod outside the allowed selector is blocked, one inside is not;
#   - the registry path: pods fetch the production alias, then version 2, from the local Cassandra node;
#   - zero downtime: while k8s/kind/load.py posts digits through the Service from inside the cluster,
#     helm upgrade to the registry, to version 2, and a config change: every request counted;
#   - the release cycle as the chart's rollout account: rollouts under load, one rolled back, a canary;
#   - training on the cluster: a 2-rank Job (charts/mnist-train, values-kind.yaml) reads the MNIST tables of
#     the local node and publishes a version, which is rolled out under load; a run whose rank is killed
#     publishes nothing;
#   - a serving container killed: failures and seconds until it serves again;
#   - bad values refused, and a pod that cannot reach its registry says so in its status.
# Then the cluster is deleted. Each phase is a function below, run in order by main; each prints its time
# as it ends.
#
#   k8s/kind-smoke.sh            (make kind-smoke; needs artifacts/model-store/mnist.mar: make archive)
#   MODEL_ARCHIVE=X.mar MODEL_METRICS=metrics.json k8s/kind-smoke.sh     (another model; the tests' own)
#   KIND_SMOKE_KEEP=1 k8s/kind-smoke.sh     (a failed run leaves its cluster up to look at)
#
# The run's output folder, KIND_SMOKE_OUT (default artifacts/kind-smoke), holds its logs and its summary:
# summary.json, or KIND_SMOKE_SUMMARY where that is set. The summary is one JSON object, written when the run
# ends, passed or failed: the outcome, the failed phase and its error, and each phase's name, seconds, outcome
# ("passed", "failed", "not run") and figures (what it counted: digits read right, requests under load, ...).
# tests/test_kind_smoke.py reads it.
#
# Starts a Docker engine where none runs (scripts/docker-engine.sh) and builds kind, kubectl and helm
# (scripts/install-k8s-tools.sh). It only ever deletes the cluster it created itself, named below.
set -o errexit -o nounset -o pipefail -o errtrace
shopt -s inherit_errexit  # a failure inside $(...) stops it too, as it would outside

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/k8s/kind"
CACHE="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}"
BIN="$CACHE/bin"
KIND="$BIN/kind" HELM="$BIN/helm" KUBECTL="$BIN/kubectl"
CHART="$ROOT/charts/mnist-serve"
TRAIN_CHART="$ROOT/charts/mnist-train"
TRAIN_RELEASE=mnist-train  # its Job has the same name
# The first N images of each MNIST split in the registry's keyspace, for the training Job: one epoch on 9,000
# (1,000 held out) is a minute of the two ranks, and reads a 7 right.
TRAINING_IMAGES=10000
CLUSTER=mnist-serve-smoke  # as in k8s/kind-cluster.yaml
NODE="$CLUSTER-control-plane"
# The node container this script created last; a cluster of this name that is not it is someone else's.
OWNED="$CACHE/kind-smoke.node-id"
NAMESPACE=mnist-serve
RELEASE=mnist-serve
SERVERS="app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=server"
# The registry the pods read, a keyspace of the local node of its own (dropped and made anew each run).
KEYSPACE=mnist_kind_smoke
PY="$ROOT/.venv/bin/python"
# The model built into the image and published to the registry (twice: versions 1 and 2), with its metrics.
export MODEL_ARCHIVE="${MODEL_ARCHIVE:-$ROOT/artifacts/model-store/mnist.mar}"
METRICS="${MODEL_METRICS:-$ROOT/artifacts/metrics.json}"
SOCAT="socat=1.7.4.4-2"
OUT="${KIND_SMOKE_OUT:-$ROOT/artifacts/kind-smoke}"
SUMMARY="${KIND_SMOKE_SUMMARY:-$OUT/summary.json}"
PHASES=(
  preflight tools node_image serving_image training_image preload host_accommodations cluster helm_install digits
  malformed_bodies flood helm_test serving_container network_policy registry upgrades_under_load rollout_account
  rollouts_under_load failed_rollout canary cluster_training trained_rollout killed_rank killed_container bad_values
  unreachable_registry teardown
)

# What the phases hand on to the later ones.
work=""                 # a folder of this run's own, deleted at the end: kubeconfigs, probe outputs
kind_image=""           # the node image, then the node image with the serving image preloaded
serving_tag=""          # the serving image
training_tag=""         # the training image
gateway=""              # where the pods reach this host (the kind network's gateway), for the local node
trained=""              # the version the 2-rank training Job published
kind_path="$PATH"       # PATH for kind: where privileged containers cannot run, the wrapper first
created=""              # set while the cluster is this run's to delete
background=()           # processes to stop at the end: port-forward, socat, kind create
values=()               # the release's helm values
registry_values=()      # the helm values that point the pods at the registry
# The summary's making.
phase_records=()        # one JSON object a finished phase
phase_figures=()        # "NAME": VALUE pairs of the phase running
current_phase="" phase_began=0 failed_phase="" failure=""
timings=()

# --- small tools ---------------------------------------------------------------------------------------
fail() { failure="$*"; echo "error: $*" >&2; exit 1; }
# The command that stopped the run, for the summary when no fail() names the reason.
remember_failed_command() { failure="exit $1 at line $2: $3"; }

json_text() { # json_text TEXT: TEXT as a JSON string
  local text
  text="$(printf '%s' "$1" | tr -d '\000-\010\013\014\016-\037')"
  text="${text//\\/\\\\}" text="${text//\"/\\\"}"
  text="${text//$'\t'/\\t}" text="${text//$'\r'/}" text="${text//$'\n'/\\n}"
  printf '"%s"' "$text"
}
json_list() { # json_list TEXT...: the TEXTs as a JSON list of strings
  local item items=()
  for item in "$@"; do items+=("$(json_text "$item")"); done
  printf '[%s]' "$(join_by ', ' "${items[@]}")"
}
join_by() { # join_by SEPARATOR ITEM...: the ITEMs with SEPARATOR between them
  local separator=$1 item
  shift
  (($#)) || return 0
  printf '%s' "$1"
  for item in "${@:2}"; do printf '%s%s' "$separator" "$item"; done
}
figure() { # figure NAME VALUE: a figure of the running phase; VALUE is JSON (a number, true, false, {...}, [...])
  local value=$2
  [[ "$value" =~ ^(-?[0-9]+(\.[0-9]+)?|true|false|null|\{.*\}|\[.*\])$ ]] || value="$(json_text "$value")"
  phase_figures+=("$(json_text "$1"): $value")
}
figure_text() { phase_figures+=("$(json_text "$1"): $(json_text "$2")"); } # figure_text NAME TEXT

k() { "$KUBECTL" --namespace "$NAMESPACE" "$@"; }
# helm without its warning that the chart's config.properties is a link (to handler/config.properties, on purpose).
helm() { "$HELM" "$@" 2> >(grep -v 'found symbolic link in path' >&2); }
kind() { PATH="$kind_path" "$KIND" "$@"; }
mnist_registry() { CASSANDRA_KEYSPACE=$KEYSPACE "$ROOT/.venv/bin/mnist-registry" "$@"; }
# mnist-registry as the rollout job runs it: the registry's keyspace, the cluster as the rollout account.
registry_as_rollout() { KUBECONFIG="$work/rollout.kubeconfig" mnist_registry "$@"; }
pinned() { k get "deployment/$1" -o jsonpath='{.spec.template.spec.containers[0].env[?(@.name=="MODEL_VERSION")].value}'; }

succeeded() { # succeeded POD: wait until POD has run to success; its log on stderr and fail if it does not
  if ! k wait --for=jsonpath='{.status.phase}'=Succeeded "pod/$1" --timeout 2m >/dev/null; then
    k logs "$1" >&2
    fail "pod $1 did not succeed"
  fi
}
client_pod() { # client_pod NAME LABEL PROGRAM [ARGUMENT...]: PROGRAM of k8s/kind (ConfigMap smoke-clients)
  # in a pod of the serving image labelled mnist-serve-client=LABEL (allowed: what the NetworkPolicy lets in)
  local command=(python3 "/clients/$3" "${@:4}")
  k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  labels: {mnist-serve-client: $2}
spec:
  restartPolicy: Never
  containers:
    - name: client
      image: $serving_tag
      imagePullPolicy: Never
      command: $(json_list "${command[@]}")
      volumeMounts: [{name: clients, mountPath: /clients}]
  volumes: [{name: clients, configMap: {name: smoke-clients}}]
EOF
}
start_load() { # start_load NAME: k8s/kind/load.py's load loop in a pod, back once it counts (a right answer)
  client_pod "$1" allowed load.py --url "http://$RELEASE:8080/predictions/mnist" --digit /clients/digit-7.json --label 7
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
expect_load() { # expect_load SUMMARY WHAT [EXPECTATION...]: fail with WHAT unless k8s/kind/expect_load.py passes
  "$PY" "$HERE/expect_load.py" "$1" "${@:3}" || fail "$2: $1"
}
upgrade() { # upgrade FIGURE WHAT HELM-ARGUMENT...: helm upgrade and wait; its seconds printed and the figure FIGURE
  local began=$SECONDS
  helm upgrade "$RELEASE" "$CHART" --namespace "$NAMESPACE" "${values[@]}" "${@:3}" --wait --timeout 10m >/dev/null
  echo "  $2: rolled out in $((SECONDS - began)) s"
  figure "$1" $((SECONDS - began))
}

# --- phases ----------------------------------------------------------------------------------------------
preflight() {
  "$ROOT/scripts/docker-engine.sh"
  [[ -f "$MODEL_ARCHIVE" ]] || fail "no $MODEL_ARCHIVE; run make archive"
  [[ -f "$METRICS" ]] || fail "no $METRICS (the archive's metrics, published with it); run make train archive"
  [[ -x "$PY" ]] || fail "no $PY; run make venv"
}

tools() { # kind, kubectl and helm, built once from Go modules
  "$ROOT/scripts/install-k8s-tools.sh" kind kube helm
}

node_image() {
  kind_image="$("$HERE/node-image.sh" | tail -n 1)"
  echo "node image: $kind_image"
  figure_text node_image "$kind_image"
}

serving_image() { # the CPU image with the model built in
  serving_tag="$("$ROOT/docker/build.sh" cpu --with-model 2>"$OUT/image-build.log" | tail -n 1)" \
    || { tail -n 30 "$OUT/image-build.log" >&2; fail "docker/build.sh cpu --with-model failed (its log: $OUT/image-build.log)"; }
  echo "serving image: $serving_tag"
  figure_text serving_image "$serving_tag"
}

training_image() { # the CPU training image (charts/mnist-train), which shares the serving image's layers but its last
  training_tag="$("$ROOT/docker/build.sh" cpu --train 2>"$OUT/training-image-build.log" | tail -n 1)" \
    || { tail -n 30 "$OUT/training-image-build.log" >&2; fail "docker/build.sh cpu --train failed (its log: $OUT/training-image-build.log)"; }
  echo "training image: $training_tag"
  figure_text training_image "$training_tag"
}

preload() { # the serving and training images in the node image's containerd (k8s/kind/preload.sh: once per build)
  kind_image="$("$HERE/preload.sh" "$kind_image" "$serving_tag" "$training_tag" | tail -n 1)"
  echo "node image with the serving and training images: $kind_image"
  figure_text node_image "$kind_image"
  # Where Docker keeps its data, the cluster's node gets a copy of the preloaded containerd, the serving image
  # unpacked, and ~2.5 GB of control plane images, etcd and logs (its volume: 12.9 GB for the 5.3 GB image).
  local size free
  size="$(docker image inspect --format '{{.Size}}' "$serving_tag")"
  free="$(df --output=avail -B1 "$(docker info --format '{{.DockerRootDir}}')" | tail -n 1)"
  ((free > 2 * size + 4 * 1024 ** 3)) || fail "the cluster's node with $serving_tag needs $(((2 * size) / 1024 ** 3 + 4)) GiB free where Docker keeps its data; $((free / 1024 ** 3)) GiB are (docker system df; docker builder prune frees the build cache)"
}

host_accommodations() { # what this host needs of kind: detected, printed in one line
  local applied=() probe missing=""
  if ! probe="$(docker run --rm --privileged --entrypoint true "$kind_image" 2>&1)"; then
    [[ "$probe" == *"apply caps"* ]] || fail "a privileged container cannot start here, for a reason this script does not know: $probe"
    kind_path="$HERE/unprivileged:$PATH"
    (((16#$(awk '/^CapBnd:/ { print $2 }' /proc/self/status) >> 24 & 1) == 1)) \
      || missing=" (CAP_SYS_RESOURCE is missing from this host's capability bounding set)"
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
    echo "host accommodations: $(join_by '; ' "${applied[@]}")"
  else
    echo "host accommodations: none (privileged containers and cgroup v2 here)"
  fi
  figure host_accommodations "$(json_list "${applied[@]}")"
}

cluster() { # the kind cluster, kube-router and CoreDNS rolled out
  if kind get clusters 2>/dev/null | grep -x "$CLUSTER" >/dev/null; then
    [[ -f "$OWNED" && "$(docker inspect --format '{{.Id}}' "$NODE" 2>/dev/null)" == "$(cat "$OWNED")" ]] \
      || fail "a kind cluster named $CLUSTER exists that this script did not create; delete it (kind delete cluster --name $CLUSTER) or keep it and skip the smoke test"
    echo "deleting the cluster an interrupted run left"
    kind delete cluster --name "$CLUSTER"
  fi
  created=yes
  kind create cluster --config "$work/kind-cluster.yaml" --image "$kind_image" --wait 3m &
  local creating=$!
  background+=("$creating")
  unpack_serving_image "$creating"
  wait "$creating"
  # Whose it is, for the next run should this one be interrupted.
  docker inspect --format '{{.Id}}' "$NODE" >"$OWNED"
  if "$KUBECTL" --namespace kube-system get daemonset kube-router >/dev/null 2>&1; then
    "$KUBECTL" --namespace kube-system rollout status daemonset/kube-router --timeout 2m
  fi
  "$KUBECTL" --namespace kube-system rollout status deployment/coredns --timeout 3m
}

unpack_serving_image() { # unpack_serving_image CREATING: while `kind create` (pid CREATING) starts the cluster
  # The node's containerd unpacks the preloaded serving image now, or the first pod would at helm install
  # (~30 s of one core, as the control plane starts on the other).
  until docker exec "$NODE" ctr --namespace k8s.io version >/dev/null 2>&1; do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 1
  done
  local reference=$serving_tag  # as containerd names it: Docker's short names are docker.io's
  [[ "$reference" == */* ]] || reference="library/$reference"
  [[ "${reference%%/*}" == *[.:]* || "${reference%%/*}" == localhost ]] || reference="docker.io/$reference"
  docker exec "$NODE" sh -c "mkdir -p /tmp/unpack && ctr --namespace k8s.io images mount '$reference' /tmp/unpack >/dev/null && ctr --namespace k8s.io images unmount --rm /tmp/unpack >/dev/null" \
    || echo "note: the node did not unpack $reference ahead; the first pod will" >&2
}

helm_install() { # helm install, and the programs the client pods run
  echo "helm install $RELEASE ($serving_tag)"
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
  values=(--values "$CHART/values-kind.yaml" --values "$work/smoke-values.yaml" --set image.tag="${serving_tag#*:}")
  helm install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --create-namespace "${values[@]}" --wait --timeout 10m
  k rollout status "deployment/$RELEASE" --timeout 5m
  k create configmap smoke-clients --from-file="$HERE/load.py" --from-file="$HERE/ping.py" \
    --from-file="$CHART/files/digit-7.json" --from-file="$ROOT/bench/flood.py" \
    --from-file="$ROOT/samples/digit-7.png" >/dev/null
}

digits() { # real test digits in every input form, through a port-forward (k8s/kind/digits.py)
  k port-forward "service/$RELEASE" :8080 >"$OUT/port-forward.log" 2>&1 &
  local forwarding=$! port=""
  background+=("$forwarding")
  # kubectl picks the local port and says which.
  until [[ -n "$port" ]]; do
    kill -0 "$forwarding" 2>/dev/null || { cat "$OUT/port-forward.log" >&2; fail "kubectl port-forward stopped"; }
    sleep 0.2
    port="$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$OUT/port-forward.log")"
  done
  "$PY" "$HERE/digits.py" "http://127.0.0.1:$port/predictions/mnist" --json "$work/digits.json"
  figure digits "$(tr -d '\n' <"$work/digits.json")"
}

malformed_bodies() { # through the Service, then a digit (from a pod: a port-forward gives up on a reset)
  client_pod bad-bodies allowed load.py --url "http://$RELEASE:8080/predictions/mnist" \
    --digit /clients/digit-7.json --label 7 --bad-bodies
  if ! k wait --for=jsonpath='{.status.phase}'=Succeeded pod/bad-bodies --timeout 2m >/dev/null; then
    k logs bad-bodies >&2
    fail "malformed bodies were not refused as they should be"
  fi
  local said
  said="$(k logs bad-bodies)"
  echo "$said"
  figure malformed_bodies "$(tail -n 1 <<<"$said")"
}

restarts() { # the serving containers' restarts, all pods together
  k get pods -l "$SERVERS" -o jsonpath='{range .items[*]}{.status.containerStatuses[0].restartCount}{"\n"}{end}' |
    awk '{ total += $1 } END { print total + 0 }'
}

flood() { # bench/flood.py from a pod through the Service: 300 and 1,000 1 MB uploads, 200 slow, beside real digits
  local before said
  before="$(restarts)"
  client_pod flood allowed flood.py --url "http://$RELEASE:8080/predictions/mnist" --test-network \
    --digit /clients/digit-7.png
  if ! k wait --for=jsonpath='{.status.phase}'=Succeeded pod/flood --timeout 5m >/dev/null; then
    k logs flood >&2
    fail "the flood client did not finish"
  fi
  said="$(k logs flood)"
  grep -v '^{' <<<"$said" || true # the table
  figure floods "[$(grep '^{' <<<"$said" | paste -sd, -)]"
  figure restarts_during_floods $(($(restarts) - before))
  [[ "$(restarts)" == "$before" ]] || fail "serving containers restarted during the floods"
  if k get pods -l "$SERVERS" -o jsonpath='{.items[*].status.containerStatuses[0].lastState.terminated.reason}' |
    grep -q OOMKilled; then
    fail "a serving container was OOMKilled during the floods"
  fi
}

helm_test() {
  helm test "$RELEASE" --namespace "$NAMESPACE" --logs --timeout 5m
}

serving_container() { # runs as uid 1000 on a read-only root filesystem
  local pod uid written
  pod="$(k get pods -l "$SERVERS" -o jsonpath='{.items[0].metadata.name}')"
  uid="$(k exec "$pod" -c torchserve -- id -u)"
  figure uid "$uid"
  [[ "$uid" == 1000 ]] || fail "the serving container runs as uid $uid, not 1000"
  if written="$(k exec "$pod" -c torchserve -- touch /probe 2>&1)"; then fail "the serving container could write its root filesystem"; fi
  figure_text touch_root "$written"
  [[ "$written" == *"Read-only file system"* ]] || fail "touch /probe failed, but not for a read-only root filesystem: $written"
  echo "ok: uid $uid; touch /probe: Read-only file system"
}

network_policy() { # a pod with the allowed label reaches the pods, one without is blocked
  # Both at once; the one to be blocked tries for 10 s, the allowed one may take up to 20.
  client_pod probe-allowed allowed ping.py --url "http://$RELEASE:8080/ping" --seconds 20
  client_pod probe-outside other ping.py --url "http://$RELEASE:8080/ping" --seconds 10
  succeeded probe-allowed
  succeeded probe-outside
  local allowed outside
  allowed="$(k logs probe-allowed)" outside="$(k logs probe-outside)"
  echo "a pod with mnist-serve-client=allowed: $allowed; one without: $outside"
  figure_text allowed "$allowed"
  figure_text outside "$outside"
  [[ "$allowed" == reached ]] || fail "the NetworkPolicy blocked a pod it allows"
  [[ "$outside" == blocked* ]] || fail "the NetworkPolicy let through a pod outside its selector"
}

registry() { # two versions in the local Cassandra node, production -> 1, reachable from the pods
  "$ROOT/scripts/cassandra.sh" up
  "$PY" "$HERE/drop_keyspace.py" "$KEYSPACE"
  mnist_registry publish "$MODEL_ARCHIVE" --metrics "$METRICS"
  mnist_registry publish "$MODEL_ARCHIVE" --metrics "$METRICS"
  mnist_registry promote 1 --alias production
  # The node listens on loopback; the pods reach this host at the kind network's gateway, where socat
  # forwards to it. Nothing outside this machine reaches that address.
  gateway="$(docker network inspect kind --format '{{range .IPAM.Config}}{{.Gateway}} {{end}}' | tr ' ' '\n' | awk '/\./ && !found { print; found = 1 }')"
  "$ROOT/scripts/apt-install.sh" socat "$SOCAT"
  socat "TCP-LISTEN:9042,bind=$gateway,fork,reuseaddr" TCP:127.0.0.1:9042 &
  background+=("$!")
  echo "the pods' registry: $gateway:9042 (socat to the local node), keyspace $KEYSPACE"
  figure_text registry "$gateway:9042"
  registry_values=(--set model.source=registry --set "cassandra.hosts[0]=$gateway" --set "cassandra.keyspace=$KEYSPACE")
}

upgrades_under_load() { # helm upgrades while load.py posts through the Service: every request counted
  start_load load-upgrade
  upgrade to_registry_s "model from the image -> the registry's production alias (version 1)" "${registry_values[@]}"
  upgrade to_version_2_s "registry version 1 -> 2" "${registry_values[@]}" --set model.version=2
  upgrade config_change_s "a config change (torchserve.extraProperties)" "${registry_values[@]}" --set model.version=2 \
    --set torchserve.extraProperties.default_response_timeout=60
  local load pod terminating models=()
  load="$(stop_load load-upgrade)"
  figure load "$load"
  # What each serving pod fetched, checked (the pods still terminating belong to the last release).
  while read -r pod terminating; do
    [[ -z "$terminating" ]] || continue
    models+=("$(k logs "$pod" -c torchserve | grep -o -m1 'registry version [^,]*, sha256 [0-9a-f]* checked' || true)")
  done < <(k get pods -l "$SERVERS" -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{"\n"}{end}')
  printf '  %s\n' "${models[@]}"
  figure serving_pods_model "$(json_list "${models[@]}")"
  echo "under load through the Service, 2 connections: $load  (target: 0 failed, 0 dropped)"
  expect_load "$load" "requests failed during the upgrades" --no-losses
}

rollout_account() { # the chart's rollout ServiceAccount: what a CI job or an in-cluster runner would have
  upgrade rollout_rbac_s "the chart's rollout RBAC" "${registry_values[@]}" --set model.version=2 \
    --set torchserve.extraProperties.default_response_timeout=60 --set rollout.rbac.create=true
  "$KUBECTL" auth can-i patch "deployment/$RELEASE" --namespace "$NAMESPACE" --as "system:serviceaccount:$NAMESPACE:$RELEASE-rollout" >/dev/null \
    || fail "the rollout account may not patch deployment/$RELEASE"
  figure rollout_account_may_patch true
  if "$KUBECTL" auth can-i patch "deployment/$RELEASE" --namespace "$NAMESPACE" --as "system:serviceaccount:$NAMESPACE:$RELEASE" >/dev/null; then
    fail "the serving pods' own account may patch deployment/$RELEASE"
  fi
  figure serving_account_may_patch false
  # A kubeconfig with the account's token, written by the shell itself (no command line ever holds the token).
  local token server authority
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
  echo "ok: $RELEASE-rollout may patch deployment/$RELEASE; the serving pods' account ($RELEASE) may not"
}

rollouts_under_load() { # production -> 1, then -> 2 under load (mnist-registry promote --deployment)
  start_load load-rollout
  local version began load
  for version in 1 2; do
    began=$SECONDS
    registry_as_rollout promote "$version" --alias production --deployment "deployment/$RELEASE" --timeout 300
    echo "  rolled out version $version in $((SECONDS - began)) s"
    figure "version_${version}_s" $((SECONDS - began))
  done
  load="$(stop_load load-rollout)"
  figure load "$load"
  echo "rollouts under load through the Service: $load  (target: every answer from version 1 or 2, 0 failed, 0 dropped)"
  expect_load "$load" "requests failed during the rollouts, or came from other versions than 1 and 2" --no-losses --versions 1 2
  figure pinned_version "$(pinned "$RELEASE")"
  [[ "$(pinned "$RELEASE")" == 2 ]] || fail "deployment/$RELEASE is pinned to $(pinned "$RELEASE"), not 2"
}

failed_rollout() { # a version that does not load is rolled out, and rolled back
  "$PY" "$HERE/damage_archive.py" "$MODEL_ARCHIVE" "$work/no-model.mar"
  mnist_registry publish "$work/no-model.mar" --metrics "$METRICS" --version 3
  start_load load-bad
  local began=$SECONDS load refusal shown production
  local expected="^error: version 3 failed \(.*does not load.*\); rolled back: deployment/$RELEASE in $NAMESPACE and alias production are on version 2 again$"
  if registry_as_rollout promote 3 --alias production --deployment "deployment/$RELEASE" --timeout 300 >"$OUT/failed-rollout.log" 2>&1; then
    cat "$OUT/failed-rollout.log"
    fail "the rollout of a version that does not load succeeded"
  fi
  cat "$OUT/failed-rollout.log"
  figure rolled_back_s $((SECONDS - began))
  load="$(stop_load load-bad)"
  figure load "$load"
  echo "rolled back in $((SECONDS - began)) s; meanwhile through the Service: $load  (target: 0 failed, 0 dropped)"
  refusal="$(grep -m1 '^error: ' "$OUT/failed-rollout.log" || true)"
  figure_text refusal "$refusal"
  [[ "$refusal" =~ $expected ]] || fail "the failed rollout did not end with its one-line reason"
  expect_load "$load" "requests failed during the rollback, or came from another version than 2" --no-losses --versions 2
  figure pinned_version "$(pinned "$RELEASE")"
  [[ "$(pinned "$RELEASE")" == 2 ]] || fail "deployment/$RELEASE is pinned to $(pinned "$RELEASE") after the rollback, not 2"
  shown="$(mnist_registry show production)"
  [[ "$shown" =~ (^|$'\n')version:\ +([0-9]+) ]] || fail "mnist-registry show production names no version: $shown"
  production=${BASH_REMATCH[2]}
  figure production_version "$production"
  [[ "$production" == 2 ]] || fail "production is on version $production, not back on 2"
}

canary() { # version 1 beside 2, then abort (mnist-registry canary)
  start_load load-canary
  registry_as_rollout canary start 1 --deployment "deployment/$RELEASE" --replicas 1 --timeout 300
  sleep 10  # of load beside the canary: a few thousand requests
  registry_as_rollout canary status --deployment "deployment/$RELEASE"
  local load left versions
  load="$(stop_load load-canary)"
  figure load "$load"
  echo "with the canary, through the Service: $load  (1 pod of 3: about a third from version 1)"
  expect_load "$load" "the canary did not get its share of the answers, or requests failed" \
    --no-losses --versions 1 2 --share 1 0.1 0.6
  registry_as_rollout canary abort --deployment "deployment/$RELEASE"
  left="$(k get pods -l "$SERVERS" -o jsonpath='{range .items[*]}{.spec.containers[0].env[?(@.name=="MODEL_VERSION")].value} {end}')"
  read -r -a versions <<<"$left"
  figure versions_after_abort "$(json_list "${versions[@]}")"
  [[ "$left" == "2 2 " ]] || fail "after the abort the serving pods are on versions '$left', not 2 and 2"
  echo "ok: after the abort only version 2 serves ($left)"
}

registry_versions() { # registry_versions FILE: mnist-registry list --json into FILE
  mnist_registry list --json >"$1"
}
train_on_the_cluster() { # train_on_the_cluster TRAIN-FLAGS: scripts/train-cluster.sh, 2 ranks on the local node
  # A quarter CPU each, as the serving pods: the control plane's 0.85 and the two serving pods' leave 0.65.
  "$ROOT/scripts/train-cluster.sh" --values "$TRAIN_CHART/values-kind.yaml" --ranks 2 --namespace "$NAMESPACE" \
    --release "$TRAIN_RELEASE" --train-flags "$1" -- --set "image.tag=${training_tag#*:}" \
    --set "cassandra.hosts[0]=$gateway" --set "cassandra.keyspace=$KEYSPACE" --set resources.requests.cpu=250m
}

cluster_training() { # a 2-rank Job (charts/mnist-train) reads the MNIST tables of the local node, publishes a version
  CASSANDRA_KEYSPACE=$KEYSPACE "$PY" -m training load-data --limit "$TRAINING_IMAGES"
  registry_versions "$work/before-training.json"
  local began=$SECONDS new
  train_on_the_cluster "--epochs 1 --any-count --val-size 1000" 2>&1 | tee "$OUT/cluster-training.log" \
    || fail "the 2-rank training Job failed (its output: $OUT/cluster-training.log)"
  figure training_s $((SECONDS - began))
  registry_versions "$work/after-training.json"
  new="$("$PY" "$HERE/new_version.py" "$work/before-training.json" "$work/after-training.json")" \
    || fail "the training Job did not publish one version"
  figure published "$new"
  trained="$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["version"])' "$new")"
  # Its lineage names the run: two ranks, the Job, the image.
  "$PY" -c 'import json, sys; run = json.loads(sys.argv[1])["run"]; sys.exit(run != {"world_size": 2, "job": sys.argv[2], "image": sys.argv[3]})' \
    "$new" "$TRAIN_RELEASE" "$training_tag" || fail "version $trained does not record the 2-rank run of Job $TRAIN_RELEASE in $training_tag: $new"
  echo "the 2-rank Job published version $trained in $((SECONDS - began)) s: $new"
}

trained_rollout() { # the version the Job published, rolled out under load (mnist-registry promote --deployment)
  start_load load-trained
  local began=$SECONDS load
  registry_as_rollout promote "$trained" --alias production --deployment "deployment/$RELEASE" --timeout 300
  figure rollout_s $((SECONDS - began))
  load="$(stop_load load-trained)"
  figure load "$load"
  echo "version $trained rolled out under load through the Service: $load  (target: answers from 2 and $trained, 0 failed, 0 dropped)"
  expect_load "$load" "requests failed during the rollout of the trained version, or it did not answer" \
    --no-losses --versions 2 "$trained"
  figure pinned_version "$(pinned "$RELEASE")"
  [[ "$(pinned "$RELEASE")" == "$trained" ]] || fail "deployment/$RELEASE is pinned to $(pinned "$RELEASE"), not $trained"
}

killed_rank() { # rank 1 killed mid-run: the Job fails, rank 1's log says so, and no version is published
  registry_versions "$work/before-kill.json"
  # Epochs enough that the run is still training when the kill lands.
  train_on_the_cluster "--epochs 30 --any-count --val-size 1000" >"$OUT/killed-rank.log" 2>&1 &
  local training=$! pod="" pid="" status=0
  background+=("$training")
  local rank1="batch.kubernetes.io/job-name=$TRAIN_RELEASE,batch.kubernetes.io/job-completion-index=1"
  until [[ -n "$pod" ]] && k wait --for=condition=Ready "$pod" --timeout 1s >/dev/null 2>&1; do
    kill -0 "$training" 2>/dev/null || { cat "$OUT/killed-rank.log" >&2; fail "the run ended before rank 1 ran"; }
    sleep 1
    pod="$(k get pods -l "$rank1" -o name 2>/dev/null | head -n 1)"
  done
  # Its whole log, kept as it is written: the Job deletes the pods it stops.
  k logs --follow "$pod" >"$work/rank-1.log" 2>&1 &
  local following=$!
  background+=("$following")
  until grep -q "^rank 1 of 2: epoch 1/" "$work/rank-1.log"; do
    kill -0 "$training" 2>/dev/null || { cat "$OUT/killed-rank.log" "$work/rank-1.log" >&2; fail "the run ended before rank 1's first epoch"; }
    sleep 1
  done
  pid="$(sed -n 's/^rank 1 of 2 (pid \([0-9]*\)).*/\1/p' "$work/rank-1.log" | head -n 1)"
  [[ -n "$pid" ]] || fail "rank 1's log names no pid: $(head -n 20 "$work/rank-1.log")"
  echo "killing rank 1 (pid $pid in $pod) after its first epoch"
  k exec "${pod#pod/}" -c train -- bash -c "kill -KILL $pid"
  wait "$training" || status=$?
  # The Job may have failed on rank 0's error first: rank 1's log is whole once its container has ended (a minute
  # at most: torchrun notices its process's death at once, and nothing signals it before that).
  for _ in {1..60}; do kill -0 "$following" 2>/dev/null || break; sleep 1; done
  cp "$work/rank-1.log" "$OUT/killed-rank-1.log"
  figure train_cluster_exit "$status"
  ((status == 1)) || { cat "$OUT/killed-rank.log" >&2; fail "scripts/train-cluster.sh exited $status after a rank was killed, not 1"; }
  local condition
  # FailureTarget: the controller's decision, set before it has stopped the other rank (Failed comes after).
  condition="$(k get job "$TRAIN_RELEASE" -o jsonpath='{.status.conditions[?(@.type=="FailureTarget")].reason}')"
  figure_text job_failed_reason "$condition"
  [[ "$condition" == PodFailurePolicy ]] || fail "the Job failed for the reason '$condition', not PodFailurePolicy"
  # torchrun's report in rank 1's pod names the rank and the signal.
  local report
  report="$(grep -E -A1 '^\s*rank\s*:\s*1 ' "$work/rank-1.log" | tr -s ' \n' ' ' || true)"
  figure_text rank_1_report "$report"
  [[ "$report" =~ exitcode\ *:\ *-9 ]] || fail "rank 1's log does not name its death by SIGKILL (exitcode -9): $(tail -n 20 "$work/rank-1.log")"
  registry_versions "$work/after-kill.json"
  "$PY" "$HERE/new_version.py" "$work/before-kill.json" "$work/after-kill.json" --none \
    || fail "a run with a killed rank published a version"
  figure published_versions 0
  echo "ok: the Job failed ($condition), rank 1's log says '$report', and nothing was published"
}

killed_container() { # SIGKILL to a serving container under load: seconds until it serves again
  start_load load-kill
  local pod container restarts killed back load
  pod="$(k get pods -l "$SERVERS" -o jsonpath='{.items[0].metadata.name}')"
  container="$(k get pod "$pod" -o jsonpath='{.status.containerStatuses[0].containerID}')"
  restarts="$(k get pod "$pod" -o jsonpath='{.status.containerStatuses[0].restartCount}')"
  figure restarts_before "$restarts"
  killed=$SECONDS
  docker exec "$NODE" ctr --namespace k8s.io tasks kill --signal SIGKILL "${container#containerd://}"
  until [[ "$(k get pod "$pod" -o jsonpath='{.status.containerStatuses[0].restartCount} {.status.containerStatuses[0].ready}')" == "$((restarts + 1)) true" ]]; do
    ((SECONDS - killed < 300)) || fail "pod $pod did not serve again within 300 s of its container's kill"
    sleep 1
  done
  back=$((SECONDS - killed))
  figure restarts_after $((restarts + 1))
  figure ready_again_s "$back"
  sleep 5
  load="$(stop_load load-kill)"
  figure load "$load"
  echo "SIGKILL to $pod's container: ready again after $back s; meanwhile through the Service: $load"
}

bad_values() { # a wrong value is refused at install time
  if helm install bad "$CHART" --namespace "$NAMESPACE" --set model.source=s3 2>"$OUT/bad-values.log"; then
    fail "helm installed model.source=s3"
  fi
  local refusal
  refusal="$(grep -m1 "at '/model/source'" "$OUT/bad-values.log" || true)"
  [[ -n "$refusal" ]] || { cat "$OUT/bad-values.log" >&2; fail "helm refused model.source=s3, but not at /model/source"; }
  figure_text refusal "$refusal"
  echo "ok: $refusal"
}

unreachable_registry() { # a pod that cannot reach its registry says so in its status
  helm install unreachable "$CHART" --namespace "$NAMESPACE" --values "$CHART/values-kind.yaml" --set replicaCount=1 \
    --set image.tag="${serving_tag#*:}" --set model.source=registry --set "cassandra.hosts[0]=127.0.0.1" --set cassandra.connectTimeoutSeconds=2
  local message=""
  for _ in $(seq 1 60); do  # 3 minutes
    message="$(k get pods -l app.kubernetes.io/instance=unreachable \
      -o jsonpath='{.items[0].status.containerStatuses[0].lastState.terminated.message}' 2>/dev/null || true)"
    [[ -z "$message" ]] || break
    sleep 3
  done
  echo "termination message: $message"
  figure_text termination_message "$message"
  [[ "$message" == *"cannot reach the model registry"* ]] || fail "expected the registry failure in the pod's status"
}

teardown() { # delete the cluster
  kind delete cluster --name "$CLUSTER"
  rm -f "$OWNED"
  created=""
}

# --- the run ---------------------------------------------------------------------------------------------
run_phase() { # run_phase NAME: the phase function NAME, its time printed as it ends and recorded
  current_phase=$1 phase_began=$SECONDS phase_figures=()
  echo "== ${1//_/ }"
  "$1"
  end_phase passed
}

end_phase() { # end_phase OUTCOME: the running phase's record
  local seconds=$((SECONDS - phase_began))
  phase_records+=("$(printf '{"name": "%s", "seconds": %d, "outcome": "%s", "figures": {%s}}' \
    "$current_phase" "$seconds" "$1" "$(join_by ', ' "${phase_figures[@]}")")")
  timings+=("$(printf '%5d s  %-7s %s' "$seconds" "$1" "${current_phase//_/ }")")
  echo "-- ${current_phase//_/ }: $1 in $seconds s"
  [[ "$1" == passed ]] || failed_phase=$current_phase
  current_phase=""
}

write_summary() { # write_summary OUTCOME: the summary, every phase in it (those not reached: "not run")
  local records=("${phase_records[@]}") phase error=null failed=null
  for phase in "${PHASES[@]:${#phase_records[@]}}"; do
    records+=("$(printf '{"name": "%s", "seconds": null, "outcome": "not run", "figures": {}}' "$phase")")
  done
  [[ -z "$failed_phase" ]] || failed="$(json_text "$failed_phase")"
  [[ "$1" == passed || -z "$failure" ]] || error="$(json_text "$failure")"
  mkdir -p "$(dirname "$SUMMARY")"
  {
    printf '{\n  "outcome": "%s",\n  "failed_phase": %s,\n  "error": %s,\n  "seconds": %d,\n' "$1" "$failed" "$error" "$SECONDS"
    printf '  "model_archive": %s,\n' "$(json_text "$MODEL_ARCHIVE")"
    printf '  "phases": [\n    %s\n  ]\n}\n' "$(join_by $',\n    ' "${records[@]}")"
  } >"$SUMMARY.partial"
  mv "$SUMMARY.partial" "$SUMMARY"
}

finish() { # on exit, passed or not: the failed phase recorded, background processes stopped, the cluster
  # deleted (or kept: KIND_SMOKE_KEEP), the summary written
  local status=$? pid outcome=passed
  trap - ERR
  [[ -z "$current_phase" ]] || end_phase failed
  ((status == 0)) || outcome=failed
  for pid in "${background[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [[ -n "$created" && -n "${KIND_SMOKE_KEEP:-}" ]]; then
    echo "kept the cluster for a look (KIND_SMOKE_KEEP): KUBECONFIG=$CACHE/kind-smoke.kubeconfig; the next run deletes it" >&2
    cp "$KUBECONFIG" "$CACHE/kind-smoke.kubeconfig"
  elif [[ -n "$created" ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -f "$OWNED"
  fi
  [[ -z "$work" ]] || rm -rf "$work"
  write_summary "$outcome"
  echo "summary: $SUMMARY"
  exit "$status"
}

main() {
  mkdir -p "$OUT"
  rm -f "$SUMMARY"
  work="$(mktemp -d)"
  export KUBECONFIG="$work/kubeconfig"  # this cluster only; ~/.kube/config is left alone
  trap 'remember_failed_command "$?" "$LINENO" "$BASH_COMMAND"' ERR
  trap finish EXIT
  local phase
  for phase in "${PHASES[@]}"; do run_phase "$phase"; done
  echo "phase times:"
  printf '%s\n' "${timings[@]}"
  echo "kind smoke test passed"
}

# Sourced (to try a function alone): the functions only.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
