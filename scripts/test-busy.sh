#!/usr/bin/env bash
# The process-heavy tests beside a CPU hog on every core, as on CI's loaded machine: a test that relies on a
# timing window, or on a process as it looked at first sight, fails here first.
# Usage: scripts/test-busy.sh [PYTEST ARGUMENTS...]   (make test-busy; with no arguments, the files below)
set -o errexit -o nounset -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

HEAVY=(tests/test_demo.py tests/test_entrypoint.py tests/test_reliability.py tests/test_serve.py
  tests/test_cassandra_faults.py tests/test_descendants.py)
hogs=()

start_hog() {
  local _
  for _ in $(seq "$(nproc)"); do
    (while :; do :; done) &
    hogs+=($!)
  done
}

stop_hog() { ((${#hogs[@]} == 0)) || kill "${hogs[@]}" 2>/dev/null || true; }

load() { cut -d' ' -f1 /proc/loadavg; }

main() {
  (($#)) || set -- "${HEAVY[@]}"
  trap stop_hog EXIT
  start_hog
  echo "test-busy: ${#hogs[@]} busy loops beside pytest; load average $(load)"
  local began=$SECONDS code=0
  .venv/bin/python -m pytest -p no:cacheprovider "$@" || code=$?
  echo "test-busy: pytest exited $code after $((SECONDS - began)) s; load average $(load)"
  return "$code"
}

main "$@"
