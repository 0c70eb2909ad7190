#!/usr/bin/env bash
# Makes the project venv from requirements.lock: exactly its packages (nothing resolved), then the
# project itself, editable, without dependencies; pip check proves the set is consistent.
#
#   scripts/venv.sh VENV        (make venv; PYTHON picks the interpreter, default python3.11)
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV=${1:?usage: scripts/venv.sh VENV}
PYTHON=${PYTHON:-python3.11}
LOCK="$ROOT/requirements.lock"
start=$SECONDS

"$PYTHON" -m venv --clear "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "$(grep '^pip==' "$LOCK")"
"${pip[@]}" --no-deps --requirement "$LOCK"
# setuptools comes from the lock too (pyproject's build-system pins the same version). Its warning that
# folders named like the packages may shadow them is about exactly these folders: not shown.
PYTHONWARNINGS=ignore "${pip[@]}" --no-deps --no-build-isolation --editable "$ROOT"
"$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null
echo "venv: $(grep -c '==' "$LOCK") locked packages installed in $VENV in $((SECONDS - start)) s"
