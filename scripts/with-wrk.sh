#!/usr/bin/env bash
# Run a load test that needs wrk: installs wrk (Debian package) when missing, then runs the command given.
# Usage: scripts/with-wrk.sh .venv/bin/python -m bench.serve --seconds 15   (make bench-serve, make soak)
set -o errexit -o nounset -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian 12's only wrk release; the pattern still takes a rebuild (+bN) of it.
scripts/apt-install.sh wrk "wrk=4.1.0-*"
exec "$@"
