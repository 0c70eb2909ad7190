#!/usr/bin/env bash
# Benchmark the served model: installs wrk (Debian package) when missing, then runs
# `python -m handler.bench` with the arguments given (see --help). Usage: scripts/bench-serve.sh [--seconds 15]
set -o errexit -o nounset -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v wrk >/dev/null; then
    echo "bench-serve: installing wrk (apt-get install wrk)" >&2
    sudo=""
    [[ $(id -u) == 0 ]] || sudo=sudo
    # A fresh machine may have no package lists yet.
    $sudo apt-get install -y --no-install-recommends wrk >/dev/null \
        || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends wrk >/dev/null; }
fi
exec .venv/bin/python -m handler.bench "$@"
