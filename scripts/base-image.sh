#!/usr/bin/env bash
# A Debian 12 + Python 3.11 base image made from Debian packages (debootstrap), for machines that
# reach package registries but no image registry: the stand-in for python:3.11-slim-bookworm, with
# what the Dockerfile relies on (python3 with pip and venv, CA certificates, apt sources).
# Built once and kept in the engine's image store; a second run builds nothing.
#
#   scripts/base-image.sh        prints the image's tag as its last line (docker/build.sh uses it)
set -o errexit -o nounset -o pipefail

CACHE="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}"
SUITE=bookworm
# The tag says what it holds; bump the last number when the package list below changes.
TAG="mnist-serve/debian-python:3.11-$SUITE-1"
PACKAGES=python3.11,python3.11-venv,python3-pip,ca-certificates
DEBOOTSTRAP="debootstrap=1.0.128+nmu2+deb12u*"

say() { echo "base-image: $*" >&2; }
fail() { echo "error: $*" >&2; exit 1; }

if docker image inspect "$TAG" >/dev/null 2>&1; then
  say "$TAG is there"
  echo "$TAG"
  exit 0
fi
[[ $(id -u) == 0 ]] || fail "building $TAG needs root (debootstrap); or pass a Python 3.11 Debian 12 image as PYTHON_IMAGE"
"$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" debootstrap "$DEBOOTSTRAP"

# The Debian mirror this machine's apt uses (a mirror or proxy of its own, where it has one).
mirror="$(sed -n 's/^URIs: *\(\S*\/debian\)\/\?$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)"
[[ -n "$mirror" ]] || mirror="$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)"
[[ -n "$mirror" ]] || fail "no Debian mirror found in this machine's apt sources"

start=$SECONDS
rootfs="$CACHE/base-image/rootfs"
log="$CACHE/base-image/debootstrap.log"
rm -rf "$rootfs" && mkdir -p "$rootfs"
say "debootstrap $SUITE from $mirror with $PACKAGES (log: $log)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" >"$log" 2>&1 \
  || { tail -n 20 "$log" >&2; fail "debootstrap failed (log: $log)"; }

# Like the python image: pip may install into this Python (the builder stage's venv does), `python`
# is Python 3, and apt finds packages (the serving stage installs the Java runtime).
rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
ln -sf python3 "$rootfs/usr/bin/python"
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb ${mirror%/debian}/debian-security $SUITE-security main
EOF
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb

tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' - "$TAG" >/dev/null
rm -rf "$rootfs"
say "built $TAG in $((SECONDS - start)) s"
echo "$TAG"
