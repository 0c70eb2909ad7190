#!/usr/bin/env bash
# The project's linters: ruff (lint and format check, configured in pyproject.toml) on the Python, and
# ShellCheck (pinned, from Debian's packages; settings in .shellcheckrc) on every shell script.
#
#   scripts/lint.sh            (make lint; make test runs it first)
#   scripts/lint.sh --fix      apply ruff's fixes and formatting, then check
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUFF="${RUFF:-$ROOT/.venv/bin/ruff}"
SHELLCHECK_PACKAGE="shellcheck=0.9.0-1"

# Every shell script the project holds: *.sh and the files without a suffix that start with a shell's #!.
shell_scripts() {
  local file
  git -C "$ROOT" ls-files --cached --others --exclude-standard | while read -r file; do
    [[ -f "$ROOT/$file" ]] || continue
    if [[ $file == *.sh ]] || { [[ $file != *.* ]] && head -n1 "$ROOT/$file" | grep -Eq '^#!.*\b(ba)?sh\b'; }; then
      printf '%s\n' "$file"
    fi
  done
}

python_lint() {
  if [[ ${1:-} == --fix ]]; then
    "$RUFF" check --fix --quiet "$ROOT"
    "$RUFF" format --quiet "$ROOT"
  fi
  "$RUFF" check --quiet "$ROOT"
  "$RUFF" format --check --quiet "$ROOT"
}

shell_lint() {
  "$ROOT/scripts/apt-install.sh" shellcheck "$SHELLCHECK_PACKAGE"
  local scripts
  mapfile -t scripts < <(shell_scripts)
  (cd "$ROOT" && shellcheck "${scripts[@]}")
  echo "lint: shellcheck: ${#scripts[@]} scripts clean"
}

main() {
  local start=$SECONDS
  case "${1:-}" in
    "" | --fix) ;;
    *) echo "usage: scripts/lint.sh [--fix]" >&2; exit 2 ;;
  esac
  python_lint "${1:-}"
  echo "lint: ruff: check and format clean"
  shell_lint
  echo "lint: done in $((SECONDS - start)) s"
}

main "$@"
