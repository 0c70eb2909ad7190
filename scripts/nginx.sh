#!/usr/bin/env bash
# Prints the path of the nginx that runs in front of TorchServe outside the image (make serve, the tests): the
# package docker/install.sh pins (NGINX_PACKAGE), the newest Debian version matching it, unpacked once into the
# cache from Debian's package (apt-get download, dpkg -x: no root, nothing installed on the system).
#
#   scripts/nginx.sh        e.g. /root/.cache/mnist-serve/nginx/1.22.1-9+deb12u12/usr/sbin/nginx
set -o errexit -o nounset -o pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
CACHE="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}/nginx"

fail() {
  echo "nginx.sh: error: $*" >&2
  exit 1
}

pinned() { # NGINX_PACKAGE of docker/install.sh, e.g. nginx=1.22.1-9+deb12u*
  sed -n 's/^NGINX_PACKAGE="\(.*\)"$/\1/p' "$ROOT/docker/install.sh"
}

unpacked() { # unpacked PATTERN: the binary of a cached version matching it, newest first
  local dir
  while read -r dir; do
    # shellcheck disable=SC2053 # the pattern is a glob on purpose
    [[ "$(basename "$dir")" == $1 && -x "$dir/usr/sbin/nginx" ]] && echo "$dir/usr/sbin/nginx" && return
  done < <(find "$CACHE" -mindepth 1 -maxdepth 1 -type d ! -name '*.partial' 2>/dev/null | sort -rV)
  return 1
}

newest() { # newest NAME PATTERN: the newest version of the package apt knows that matches
  local version
  while read -r version; do
    # shellcheck disable=SC2053
    [[ "$version" == $2 ]] && echo "$version" && return
  done < <(apt-cache madison "$1" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | sort -rV)
  return 1
}

fetch() { # fetch NAME VERSION: download and unpack it into the cache
  local work="$CACHE/$2.partial"
  rm -rf "$work"
  mkdir -p "$work"
  (cd "$work" && apt-get download "$1=$2" >/dev/null 2>&1) || fail "apt-get download $1=$2 failed"
  dpkg -x "$work"/*.deb "$work/root"
  rm -f "$work"/*.deb
  mv "$work/root" "$CACHE/$2"
  rm -rf "$work"
  echo "nginx.sh: unpacked $1 $2 into $CACHE/$2" >&2
}

main() {
  local package name pattern version
  package="$(pinned)"
  [[ -n "$package" ]] || fail "no NGINX_PACKAGE line in docker/install.sh"
  name="${package%%=*}" pattern="${package#*=}"
  unpacked "$pattern" && return
  if ! version="$(newest "$name" "$pattern")"; then
    # A fresh machine has no package lists; refreshing them needs root.
    [[ $(id -u) == 0 ]] || fail "apt knows no $package: run 'sudo apt-get update' once"
    apt-get update >/dev/null 2>&1 || fail "apt-get update failed"
    version="$(newest "$name" "$pattern")" || fail "Debian's archive has no $package"
  fi
  fetch "$name" "$version"
  unpacked "$pattern" || fail "unpacked $name $version, but $CACHE/$version/usr/sbin/nginx is not there"
}

main "$@"
