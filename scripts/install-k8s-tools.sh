#!/usr/bin/env bash
# Builds the pinned Kubernetes tools from Go modules into a cache outside the
# checkout, because this machine reaches package registries only (no release
# downloads, no Docker). A tool whose stamp matches its pinned version is skipped.
#
#   scripts/install-k8s-tools.sh [helm|kwok|kube|etcd|kube-node|kind|coredns|kube-router|gateway-api-crds ...]
#   (default: helm kwok etcd kube, what the kwok cluster needs; the rest are the kind node's)
#
# Binaries land in ${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}/bin.
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=SCRIPTDIR/versions.env
source "$ROOT/scripts/versions.env"

CACHE="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}"
BIN="$CACHE/bin"
BUILD="$CACHE/build"
mkdir -p "$BIN" "$BUILD"

# local toolchain only: go must never try to download a newer one.
# Module and build caches live in the cache dir so a fresh checkout rebuilds nothing.
# CGO off: static binaries, as upstream releases them, and no C compiler needed.
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0 \
  GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build"

# Other work shares the 2 cores; -p 2 also caps the memory of parallel links.
# go's download chatter goes to $BUILD/<tool>.log, shown only when a step fails.
go_nice() {
  nice -n 10 go "$@" >>"$LOG" 2>&1 || { tail -n 40 "$LOG" >&2; echo "full log: $LOG" >&2; return 1; }
}
BUILD_FLAGS=(-p 2 -trimpath)

have() { # have TOOL VERSION BINARY...: the stamp matches and every binary exists
  local tool=$1 version=$2 b
  shift 2
  [[ "$(cat "$BIN/.$tool.version" 2>/dev/null)" == "$version" ]] || return 1
  for b in "$@"; do [[ -x "$BIN/$b" ]] || return 1; done
}

gomod_of() { # gomod_of MODULE@VERSION: path of that module's go.mod in the module cache
  download_field GoMod "$1"
}
moddir_of() { # moddir_of MODULE@VERSION: the folder of that module's files in the module cache
  download_field Dir "$1"
}
download_field() { # download_field FIELD MODULE@VERSION
  local json
  json="$(go mod download -json "$2")" || { echo "$json" >&2; return 1; }
  sed -n "s/^\\s*\"$1\": \"\\(.*\\)\",\\?$/\\1/p" <<<"$json"
}

# Each tool is built from exactly its pinned module version, never a newer release go chose on its
# own: checked after `go get` in a wrapper module (before the long build), and in every binary.
check_resolved() { # check_resolved MODULE WANT   (in the wrapper module's directory)
  pinned_or_fail "$1" "$(go list -m -f '{{.Version}}' "$1")" "$2"
}
check_module() { # check_module BINARY MODULE WANT   (the module versions go records in the binary)
  pinned_or_fail "$2" "$(go version -m "$1" | awk -v m="$2" '($1 == "mod" || $1 == "dep") && $2 == m { print $3; exit }')" "$3"
}
pinned_or_fail() { # pinned_or_fail MODULE GOT WANT
  if [[ "$2" != "$3" ]]; then
    echo "error: $1 resolved to ${2:-nothing}, pinned $3 (scripts/versions.env)" >&2
    return 1
  fi
}

# Refuse to stamp a binary that does not report the pinned version: a wrong
# version string makes kwokctl pass the wrong flags to the control plane.
check_version() { # check_version WANT BINARY ARGS...
  local want=$1 out
  shift
  out="$("$@" 2>&1)"
  if [[ "$out" != *"$want"* ]]; then
    echo "error: '$*' printed '$out', expected $want" >&2
    return 1
  fi
}

# A plain `go install` gives a helm that calls itself "v3.21" and renders charts
# with .Capabilities.KubeVersion v1.20.0; upstream's Makefile sets these ldflags.
install_helm() {
  local gomod k8s_minor v=helm.sh/helm/v3
  gomod="$(gomod_of "$v@$HELM_VERSION")"
  k8s_minor="$(sed -n 's#^\s*k8s\.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod")"
  local ldflags="-s -w -X $v/internal/version.version=$HELM_VERSION
    -X $v/pkg/lint/rules.k8sVersionMajor=1 -X $v/pkg/lint/rules.k8sVersionMinor=$k8s_minor
    -X $v/pkg/chartutil.k8sVersionMajor=1 -X $v/pkg/chartutil.k8sVersionMinor=$k8s_minor"
  GOBIN="$BIN" go_nice install "${BUILD_FLAGS[@]}" -ldflags "${ldflags//$'\n'/ }" \
    "$v/cmd/helm@$HELM_VERSION"
  check_module "$BIN/helm" "$v" "$HELM_VERSION"
  check_version "$HELM_VERSION" "$BIN/helm" version --template '{{.Version}}'
}

install_kwok() {
  GOBIN="$BIN" go_nice install "${BUILD_FLAGS[@]}" -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
  check_module "$BIN/kwok" sigs.k8s.io/kwok "$KWOK_VERSION"
  check_module "$BIN/kwokctl" sigs.k8s.io/kwok "$KWOK_VERSION"
  check_version "$KWOK_VERSION" "$BIN/kwok" --version
  check_version "$KWOK_VERSION" "$BIN/kwokctl" --version
}

# Wrapper module: `go install k8s.io/kubernetes/cmd/...@v` is refused because
# k8s.io/kubernetes' go.mod replaces its staging modules (k8s.io/api, ...) with
# local paths; the wrapper points each at its published v0.<minor>.<patch> tag.
# One wrapper for the control plane (kwok) and the node binaries (kind), so they share compiled packages.
KUBE_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kubeadm kube-proxy)
build_kube() { # build_kube CMD...: those of KUBE_CMDS, into $BIN
  local dir="$BUILD/kube-$KUBE_VERSION" gomod staging m
  local pkgs=("${KUBE_CMDS[@]/#/k8s.io/kubernetes/cmd/}")
  # Each package with its version: without one, go upgrades k8s.io/kubernetes to its newest
  # release, which does not build against the staging modules pinned below.
  local versioned=("${pkgs[@]/%/@$KUBE_VERSION}")
  local minor patch
  IFS=. read -r _ minor patch <<<"$KUBE_VERSION"
  local staging_version="v0.$minor.$patch"

  gomod="$(gomod_of "k8s.io/kubernetes@$KUBE_VERSION")"
  staging=$(sed -n 's#^\s*\(k8s\.io/[^ ]*\) => \./staging/.*#\1#p' "$gomod")

  rm -rf "$dir" && mkdir -p "$dir"
  # Same go/godebug lines as upstream, since the main module decides GODEBUG defaults.
  { echo "module mnist-serve.local/kube-tools"; grep -E '^(go|godebug) ' "$gomod"; } >"$dir/go.mod"
  local edits=(-require="k8s.io/kubernetes@$KUBE_VERSION")
  for m in $staging; do edits+=(-replace="$m=$m@$staging_version"); done
  (cd "$dir" && go mod edit "${edits[@]}" && go_nice get -tool "${versioned[@]}")
  (cd "$dir" && check_resolved k8s.io/kubernetes "$KUBE_VERSION")

  # Without these the binaries report v0.0.0 and kwokctl picks obsolete flags.
  local ldflags="-s -w
    -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION
    -X k8s.io/component-base/version.gitMajor=1
    -X k8s.io/component-base/version.gitMinor=$minor
    -X k8s.io/component-base/version.gitTreeState=clean
    -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
  (cd "$dir" && go_nice build "${BUILD_FLAGS[@]}" -ldflags "${ldflags//$'\n'/ }" -o "$BIN/" "${@/#/k8s.io/kubernetes/cmd/}")
  for m in "$@"; do
    check_module "$BIN/$m" k8s.io/kubernetes "$KUBE_VERSION"
    case $m in
      kubectl) check_version "$KUBE_VERSION" "$BIN/kubectl" version --client ;;
      kubeadm) check_version "$KUBE_VERSION" "$BIN/kubeadm" version -o short ;;
      *) check_version "$KUBE_VERSION" "$BIN/$m" --version ;;
    esac
  done
}

# kubectl too: the machine's may be several minors older than the API server (skew warnings).
install_kube() { build_kube kube-apiserver kube-controller-manager kube-scheduler kubectl; }
# What a kind node runs besides the control plane (k8s/kind/node-image.sh).
install_kube_node() { build_kube kubelet kubeadm kube-proxy; }

install_kind() {
  GOBIN="$BIN" go_nice install "${BUILD_FLAGS[@]}" -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
  check_module "$BIN/kind" sigs.k8s.io/kind "$KIND_VERSION"
  check_version "$KIND_VERSION" "$BIN/kind" version
}

# CoreDNS with only the plugins kubeadm's Corefile uses (k8s/kind/coredns/main.go): the full set,
# with every cloud provider's SDK, takes ~11 min to build on 2 cores.
install_coredns() {
  local dir="$BUILD/coredns-$COREDNS_VERSION"
  rm -rf "$dir" && mkdir -p "$dir" && cp "$ROOT/k8s/kind/coredns/main.go" "$dir/"
  (cd "$dir" && go_nice mod init mnist-serve.local/coredns &&
    go_nice get "github.com/coredns/coredns@$COREDNS_VERSION" &&
    GOFLAGS=-mod=mod go_nice mod tidy && check_resolved github.com/coredns/coredns "$COREDNS_VERSION" &&
    go_nice build "${BUILD_FLAGS[@]}" -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" -o "$BIN/coredns" .)
  check_module "$BIN/coredns" github.com/coredns/coredns "$COREDNS_VERSION"
  check_version "${COREDNS_VERSION#v}" "$BIN/coredns" -version
}

# The NetworkPolicy controller of the kind cluster (its firewall only: routes and services stay kube-proxy's).
install_kube_router() {
  local v=github.com/cloudnativelabs/kube-router/v2
  local ldflags="-s -w -X $v/pkg/version.Version=$KUBE_ROUTER_VERSION"
  GOBIN="$BIN" go_nice install "${BUILD_FLAGS[@]}" -ldflags "$ldflags" "$v/cmd/kube-router@$KUBE_ROUTER_VERSION"
  check_module "$BIN/kube-router" "$v" "$KUBE_ROUTER_VERSION"
  check_version "$KUBE_ROUTER_VERSION" "$BIN/kube-router" --version
}

# etcd's server module also replaces its sibling modules with local paths.
install_etcd() {
  local dir="$BUILD/etcd-$ETCD_VERSION" pkg=go.etcd.io/etcd/server/v3
  rm -rf "$dir" && mkdir -p "$dir"
  (cd "$dir" && go_nice mod init mnist-serve.local/etcd-tools &&
    go_nice get -tool "$pkg@$ETCD_VERSION" && check_resolved "$pkg" "$ETCD_VERSION" &&
    go_nice build "${BUILD_FLAGS[@]}" -ldflags "-s -w" -o "$BIN/etcd" "$pkg")
  check_module "$BIN/etcd" "$pkg" "$ETCD_VERSION"
  check_version "${ETCD_VERSION#v}" "$BIN/etcd" --version
}

install_gateway_api() {
  # Not a program: the Gateway API's standard CRDs (HTTPRoute and the rest) from its module, for the chart's
  # HTTPRoute to be validated by a real API server (tests/test_chart_cluster.py).
  local dir
  dir="$(moddir_of "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION")"
  rm -rf "$BIN/gateway-api-crds" && mkdir -p "$BIN/gateway-api-crds"
  cp "$dir"/config/crd/standard/*.yaml "$BIN/gateway-api-crds/"
  chmod -R u+w "$BIN/gateway-api-crds"
}

install() { # install TOOL VERSION BINARY...
  local tool=$1 version=$2 start=$SECONDS
  shift 2
  if have "$tool" "$version" "$@"; then
    printf '%-5s %-9s already there (%s)\n' "$tool" "$version" "$*"
    return
  fi
  printf '%-5s %-9s building %s ...\n' "$tool" "$version" "$*"
  rm -f "$BIN/.$tool.version"
  LOG="$BUILD/$tool.log"
  : >"$LOG"
  "install_$tool"
  echo "$version" >"$BIN/.$tool.version"
  printf '%-5s %-9s installed in %ss\n' "$tool" "$version" "$((SECONDS - start))"
}

# Sourced (by tests/test_pinned_tools.py): the functions only.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0

# One build at a time: two would share the wrapper modules' folders (a second `make` target, a test).
exec 9>"$BIN/.install.lock"
flock 9

tools=("$@")
[[ ${#tools[@]} -gt 0 ]] || tools=(helm kwok etcd kube)
for t in "${tools[@]}"; do
  case "$t" in
    helm) install helm "$HELM_VERSION" helm ;;
    kwok | kwokctl) install kwok "$KWOK_VERSION" kwok kwokctl ;;
    kube | kube-apiserver | kube-controller-manager | kube-scheduler | kubectl)
      install kube "$KUBE_VERSION" kube-apiserver kube-controller-manager kube-scheduler kubectl ;;
    etcd) install etcd "$ETCD_VERSION" etcd ;;
    kube-node | kubelet | kubeadm | kube-proxy) install kube_node "$KUBE_VERSION" kubelet kubeadm kube-proxy ;;
    kind) install kind "$KIND_VERSION" kind ;;
    coredns) install coredns "$COREDNS_VERSION" coredns ;;
    kube-router) install kube_router "$KUBE_ROUTER_VERSION" kube-router ;;
    gateway-api-crds) install gateway_api "$GATEWAY_API_VERSION" gateway-api-crds ;;
    *) echo "unknown tool '$t' (want: helm kwok kube etcd kube-node kind coredns kube-router gateway-api-crds)" >&2; exit 2 ;;
  esac
done
echo "tools in $BIN (total ${SECONDS}s)"
