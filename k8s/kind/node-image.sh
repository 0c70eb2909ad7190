#!/usr/bin/env bash
# The kind node image of the smoke test (k8s/kind-smoke.sh). kind's own (kindest/node, pinned by kind
# v0.33.0 at Kubernetes 1.37) where it can be pulled; where it cannot, one assembled from package registries
# only, for KUBE_VERSION (scripts/versions.env):
#   - the node's root filesystem from Debian packages (debootstrap: systemd, containerd, runc, iptables,
#     the CNI plugins) with kind's base-image files from the kind module (its entrypoint, systemd units);
#   - kubelet, kubeadm, kubectl, and the control plane, etcd, CoreDNS, pause and kube-proxy images, built
#     from Go modules (scripts/install-k8s-tools.sh) and preloaded into the node's containerd under the
#     names `kubeadm config images list` gives;
#   - pod networking from a static CNI config (ptp, one node) and NetworkPolicy enforced by kube-router's
#     firewall (kindnetd, kind's own CNI, is not on the Go module proxy; k8s/kind/network-policy.yaml);
#   - k8s/kind/entrypoint.sh in front of kind's, for hosts where nodes cannot run privileged.
# Built once: the tag carries a hash of what goes in, so a second run builds nothing.
#
#   k8s/kind/node-image.sh          prints the image's name as its last line
#   KIND_NODE_IMAGE=NAME ...        use that image instead (printed as is)
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/k8s/kind"
CACHE="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}"
BIN="$CACHE/bin"
# shellcheck source=SCRIPTDIR/../../scripts/versions.env
source "$ROOT/scripts/versions.env"
SUITE=bookworm
PACKAGES=systemd,systemd-sysv,dbus,conntrack,iptables,ipset,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,fuse-overlayfs,bash,ca-certificates,curl,jq,procps,containerd,runc,containernetworking-plugins,e2fsprogs
DEBOOTSTRAP="debootstrap=1.0.128+nmu2+deb12u*"

say() { echo "node-image: $*" >&2; }
fail() { echo "error: $*" >&2; exit 1; }
step_log() { # step_log NAME COMMAND...: run it into $work/NAME.log; on failure name the step and show its log
  local name=$1
  shift
  "$@" >"$work/$name.log" 2>&1 || { tail -n 30 "$work/$name.log" >&2; fail "node image: $name failed (log: $CACHE/kind-node/$name.log)"; }
}
unmount_below() { # unmount_below DIR: what a killed debootstrap left mounted there (its /proc), deepest first
  local mounts
  mounts="$(awk -v dir="$1/" 'index($2, dir) == 1 { print $2 }' /proc/self/mounts | sort -r)"
  [[ -z "$mounts" ]] || xargs -n 1 umount --lazy <<<"$mounts"
}
# Sourced (by tests/test_kind_smoke.py): the functions only.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0

if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then
  echo "$KIND_NODE_IMAGE"
  exit 0
fi
hash="$(cat "$0" "$HERE"/entrypoint.sh "$HERE"/network-policy.yaml "$HERE"/coredns/main.go "$ROOT/scripts/versions.env" | sha256sum | cut -c1-12)"
TAG="mnist-serve/kind-node:$KUBE_VERSION-$hash"
if docker image inspect "$TAG" >/dev/null 2>&1; then
  say "$TAG is there"
  echo "$TAG"
  exit 0
fi
KIND_MODULE="$(GOTOOLCHAIN=local GOMODCACHE="$CACHE/go/mod" GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p')"
kind_default="$(sed -n 's/^const Image = "\(.*\)"$/\1/p' "$KIND_MODULE/pkg/apis/config/defaults/image.go")"
if docker image inspect "$kind_default" >/dev/null 2>&1 || docker pull --quiet "$kind_default" >/dev/null 2>&1; then
  say "using kind's own node image $kind_default"
  echo "$kind_default"
  exit 0
fi
say "kind's node image ${kind_default%@*} cannot be pulled here: building $TAG from package registries"
[[ $(id -u) == 0 ]] || fail "building the node image needs root (debootstrap); or pass one as KIND_NODE_IMAGE"

start=$SECONDS
work="$CACHE/kind-node"
# A run killed during debootstrap leaves the node's /proc mounted, and rm cannot delete what is in it.
unmount_below "$work"
rm -rf "$work" || fail "cannot delete $work, the last build's files"
mkdir -p "$work/images"
debootstrap_pid="" containerd_pid=""
# shellcheck disable=SC2086 # (either may be empty)
trap 'kill $debootstrap_pid $containerd_pid 2>/dev/null || true; unmount_below "$work"' EXIT

say "node root filesystem: debootstrap $SUITE (log: $work/debootstrap.log)"
"$ROOT/scripts/apt-install.sh" debootstrap "$DEBOOTSTRAP"
mirror="$(sed -n 's/^URIs: *\(\S*\/debian\)\/\?$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)"
[[ -n "$mirror" ]] || mirror="$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)"
[[ -n "$mirror" ]] || fail "no Debian mirror found in this machine's apt sources"
rootfs="$work/rootfs"
# In the background: it waits on the network and the disk while the Go builds below take the CPU.
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 &
debootstrap_pid=$!

say "Go binaries (scripts/install-k8s-tools.sh; cached after the first build)"
"$ROOT/scripts/install-k8s-tools.sh" kube kube-node etcd coredns kube-router >&2

# The image names kubeadm will look for, by their last path element: kube-apiserver, etcd, coredns, pause...
declare -A image
while read -r name; do
  base="${name##*/}"
  image[${base%%:*}]="$name"
done < <("$BIN/kubeadm" config images list --kubernetes-version "$KUBE_VERSION")
image[kube-router]="mnist-serve.local/kube-router:$KUBE_ROUTER_VERSION"

# Its own log, inside the root filesystem, says why; the outer one only how far it got.
wait "$debootstrap_pid" || { tail -n 30 "$work/debootstrap.log" "$rootfs/debootstrap/debootstrap.log" >&2
  fail "node image: debootstrap failed (logs: $work/debootstrap.log, $rootfs/debootstrap/debootstrap.log)"; }

# What kind's images/base/Dockerfile does on top of its Debian image.
files="$KIND_MODULE/images/base/files"
install -m 0755 "$files"/usr/local/bin/* "$rootfs/usr/local/bin/"
mkdir -p "$rootfs/kind/bin" "$rootfs/kind/manifests" "$rootfs/etc/kubernetes/manifests" "$rootfs/opt/cni/bin" "$rootfs/etc/cni/net.d"
install -m 0755 "$files"/kind/bin/* "$rootfs/kind/bin/"
cp -r "$files"/etc/. "$rootfs/etc/"
chmod -R u=rwX,go=rX "$rootfs/etc/containerd" "$rootfs/etc/systemd/system" "$rootfs/etc/default" "$rootfs/etc/sysctl.d"
(
  cd "$rootfs"
  find lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete
  rm -f lib/systemd/system/multi-user.target.wants/* etc/systemd/system/*.wants/* lib/systemd/system/local-fs.target.wants/* \
    lib/systemd/system/sockets.target.wants/*udev* lib/systemd/system/sockets.target.wants/*initctl* lib/systemd/system/basic.target.wants/*
  echo "ReadKMsg=no" >>etc/systemd/journald.conf
  ln -sf /usr/lib/systemd/systemd sbin/init
  # kind's units and scripts expect containerd and the CNI plugins where its own build puts them.
  ln -sf /usr/bin/containerd usr/local/bin/containerd
  cp usr/lib/cni/* opt/cni/bin/
)
for unit in kubelet.service containerd.service undo-mount-hacks.service; do
  mkdir -p "$rootfs/etc/systemd/system/multi-user.target.wants"
  ln -sf "/etc/systemd/system/$unit" "$rootfs/etc/systemd/system/multi-user.target.wants/$unit"
done
ln -sf /dev/null "$rootfs/etc/systemd/system/systemd-binfmt.service"
chroot "$rootfs" ctr oci spec \
  | jq '.hooks.createContainer[.hooks.createContainer | length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
  | jq 'del(.process.rlimits)' >"$rootfs/etc/containerd/cri-base.json"
# The sandbox (pause) image kubeadm lists, which the node holds, instead of the one in kind's config.
sed -i "s|^\(\s*sandbox_image = \).*|\1\"${image[pause]}\"|" "$rootfs/etc/containerd/config.toml"
install -m 0755 "$BIN/kubelet" "$BIN/kubeadm" "$BIN/kubectl" "$rootfs/usr/bin/"
echo "$KUBE_VERSION" >"$rootfs/kind/version"
# Pod networking for one node: each pod a veth pair routed by the node (ptp), addresses from kind's
# default pod subnet. kind applies /kind/manifests/default-cni.yaml once the API server is up.
cat >"$rootfs/etc/cni/net.d/10-ptp.conflist" <<'EOF'
{
  "cniVersion": "1.0.0",
  "name": "kind-ptp",
  "plugins": [
    {"type": "ptp", "ipMasq": true, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}, "mtu": 1500},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
sed "s|KUBE_ROUTER_IMAGE|${image[kube-router]}|" "$HERE/network-policy.yaml" >"$rootfs/kind/manifests/default-cni.yaml"
install -m 0755 "$HERE/entrypoint.sh" "$rootfs/usr/local/bin/mnist-serve-entrypoint"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb

say "component images: ${!image[*]}"
import() { # import DIR NAME ENTRYPOINT_JSON: a tar of DIR as image NAME
  tar --numeric-owner -C "$1" -c . | docker import --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' \
    ${3:+--change "ENTRYPOINT $3"} - "$2" >/dev/null
}
static_image() { # static_image NAME BINARY [ENTRYPOINT_JSON]: one static binary in /usr/local/bin and / (CoreDNS and pause run as /NAME)
  local dir="$work/static/${2##*/}"
  mkdir -p "$dir/usr/local/bin" "$dir/etc" "$dir/tmp"
  install -m 0755 "$2" "$dir/usr/local/bin/"
  ln -sf "usr/local/bin/${2##*/}" "$dir/${2##*/}"
  echo 'hosts: files dns' >"$dir/etc/nsswitch.conf"
  import "$dir" "$1" "${3:-}"
}
for m in kube-apiserver kube-controller-manager kube-scheduler etcd; do static_image "${image[$m]}" "$BIN/$m"; done
static_image "${image[coredns]}" "$BIN/coredns" '["/coredns"]'
pause_c="$(GOTOOLCHAIN=local GOMODCACHE="$CACHE/go/mod" GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p')/build/pause/linux/pause.c"
mkdir -p "$work/pause"
step_log pause gcc -Os -Wall -Werror -static -DVERSION="v${image[pause]##*:}" -o "$work/pause/pause" "$pause_c"
static_image "${image[pause]}" "$work/pause/pause" '["/pause"]'
# kube-proxy and kube-router call iptables and ipset: they run on the node's own root filesystem, one
# layer shared with the node image and between them.
import "$rootfs" "$TAG-rootfs" ""
for m in kube-proxy kube-router; do
  mkdir -p "$work/context/$m" && install -m 0755 "$BIN/$m" "$work/context/$m/"
  printf 'FROM %s\nCOPY %s /usr/local/bin/\nENTRYPOINT ["/usr/local/bin/%s"]\n' "$TAG-rootfs" "$m" "$m" \
    | step_log "image-$m" docker build --tag "${image[$m]}" --file - "$work/context/$m"
done
step_log save docker save --output "$work/images.tar" "${image[@]}"

say "preloading them into the node's containerd (a containerd of its own on this host, --no-unpack)"
store="$rootfs/var/lib/containerd"
mkdir -p "$store" "$work/containerd-state"
cat >"$work/containerd.toml" <<EOF
version = 2
root = "$store"
state = "$work/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
EOF
"$rootfs/usr/bin/containerd" --config "$work/containerd.toml" >"$work/containerd.log" 2>&1 &
containerd_pid=$!
for _ in $(seq 30); do [[ -S "$work/containerd.sock" ]] && break; sleep 0.5; done
step_log ctr-import "$rootfs/usr/bin/ctr" --address "$work/containerd.sock" --namespace k8s.io images import --no-unpack --digests "$work/images.tar"
kill "$containerd_pid" || true
wait "$containerd_pid" 2>/dev/null || true
containerd_pid=""
rm -f "$work/images.tar"

say "node image $TAG"
mkdir -p "$work/context/node/var/lib" && mv "$store" "$work/context/node/var/lib/"
# systemd stops cleanly on SIGRTMIN+3, as in kind's own image.
cat <<EOF | step_log image-node docker build --tag "$TAG" --file - "$work/context/node"
FROM $TAG-rootfs
COPY var/lib/containerd /var/lib/containerd
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/mnist-serve-entrypoint", "/sbin/init"]
LABEL org.opencontainers.image.description="kind node, Kubernetes $KUBE_VERSION, assembled from package registries by mnist-serve's k8s/kind/node-image.sh (its etcd image holds etcd $ETCD_VERSION)"
EOF
docker image rm "$TAG-rootfs" "${image[@]}" >/dev/null
rm -rf "$work/rootfs" "$work/static" "$work/context"
say "built $TAG in $((SECONDS - start)) s"
echo "$TAG"
