#!/usr/bin/env bash
# Installs a Debian package, at a pinned version, when the command it brings is missing.
#
#   scripts/apt-install.sh COMMAND PACKAGE=VERSION      e.g. scripts/apt-install.sh socat "socat=1.7.4.4-2"
#
# The version may end in * to take Debian's security and rebuild suffixes (+deb12uN, +bN) of one release.
# Package lists are refreshed only when the install fails (a fresh machine has none). Services the package
# would start are not started: the project starts what it needs itself, with its own configuration.
# Says one line when it installs; an error is one line and exit 1.
set -o errexit -o nounset -o pipefail

usage="usage: scripts/apt-install.sh COMMAND PACKAGE=VERSION"
command=${1:?$usage}
package=${2:?$usage}
[[ $package == *=* ]] || { echo "error: $package names no version ($usage)" >&2; exit 2; }
command -v "$command" >/dev/null && exit 0

sudo=""
[[ $(id -u) == 0 ]] || sudo=sudo
echo "apt-install: installing $package (for $command)" >&2
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\n# scripts/apt-install.sh of mnist-serve: no service starts while it installs.\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod +x "$policy"
  trap '$sudo rm -f "$policy"' EXIT
fi
install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends "$package" >/dev/null 2>&1; }
install || { $sudo apt-get update >/dev/null 2>&1 && install; } \
  || { echo "error: apt-get install $package failed (run it by hand to see why)" >&2; exit 1; }
command -v "$command" >/dev/null || { echo "error: $package is installed but there is no $command on PATH" >&2; exit 1; }
