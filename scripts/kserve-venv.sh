#!/usr/bin/env bash
# The benchmark's peer, KServe's Python model server, in a venv of its own under the cache, made from
# scripts/kserve.lock (make lock writes it) and never part of the serving image. Prints the venv's path.
#
#   scripts/kserve-venv.sh        (bench/serve.py runs it; a second run reuses the venv)
#
# torch is not installed there (5 GB with its CUDA libraries): bench/kserve_peer.py takes it from
# the project venv, after the peer's own packages (KServe pins versions the project's lock does not).
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-python3.11}
LOCK="$ROOT/scripts/kserve.lock"
CACHE="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}"
# One venv per lock: a changed lock makes a new one rather than patching an old one.
VENV="$CACHE/kserve-venv-$(sha256sum "$LOCK" | cut -c1-12)"

if [[ ! -f $VENV/.installed ]]; then
    start=$SECONDS
    echo "kserve-venv: installing $(grep -c '==' "$LOCK") locked packages into $VENV" >&2
    "$PYTHON" -m venv --clear "$VENV"
    pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${pip[@]}" "$(grep '^pip==' "$ROOT/requirements.lock")"
    "${pip[@]}" --no-deps --requirement "$LOCK"
    "$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null
    touch "$VENV/.installed"
    echo "kserve-venv: done in $((SECONDS - start)) s" >&2
fi
echo "$VENV"
