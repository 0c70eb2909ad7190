#!/usr/bin/env bash
# Run a load test that needs wrk: installs wrk (Debian package) when missing, then runs the command given.
# Usage: scripts/with-wrk.sh .venv/bin/python -m handler.bench --seconds 15   (make bench-serve, make soak)
set -o errexit -o nounset -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v wrk >/dev/null; then
    # Debian 12's only wrk release; the pattern still takes a rebuild (+bN) of it.
    package="wrk=4.1.0-*"
    echo "with-wrk: installing $package (apt-get install)" >&2
    sudo=""
    [[ $(id -u) == 0 ]] || sudo=sudo
    # A fresh machine may have no package lists yet.
    $sudo apt-get install -y --no-install-recommends "$package" >/dev/null \
        || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends "$package" >/dev/null; }
fi
exec "$@"
