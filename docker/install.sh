#!/usr/bin/env bash
# The serving image's install steps. The Dockerfile runs them; the tests run the same commands on a
# machine without Docker (tests/test_image.py), so a broken step fails there first.
#
#   docker/install.sh python cpu|gpu PREFIX [--dry-run] [--without-pip] [--with-training]
#       A venv at PREFIX with the pinned packages of docker/requirements*.txt, refused if the resolved
#       set holds anything unpinned; triton (torch.compile's, unused) taken out; then checked: pip check,
#       and the imports TorchServe's workers and the entrypoint make.
#       --dry-run resolves the pins against the package index without installing them.
#       --with-training adds docker/requirements-train.txt (resolved together: the dry run's check).
#       --without-pip removes pip from the venv at the end (the image has no installer).
#       cpu: torch's CPU-only build from the wheel index named by TORCH_INDEX_URL (PyTorch's CPU
#       wheel index, its whl/cpu path); without it, torch's default build from the default index,
#       which runs on a CPU but carries ~4 GB of CUDA libraries (a warning says so).
#   docker/install.sh training VENV DIR
#       The training image's additions (docker/requirements-train.txt: plots, the archiver) into DIR, apart
#       from the serving venv VENV, so the training image shares the serving image's venv layer; checked
#       by importing them with VENV's Python and DIR on its path.
#   docker/install.sh system [--dry-run]
#       As root in the final stage: the Java 17 runtime TorchServe's frontend runs on, the
#       model-server user (uid 1000) and its directories, and no pip in the system Python.
#       --dry-run only simulates the apt install (apt-get -s) and prints the rest.
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION=2.14.1
# TorchServe 0.12 supports Java 11 and 17; 17 is what the tests run. The version pattern pins the
# major release and takes Debian's security updates, which replace superseded packages in the archive
# (an exact version would stop building within weeks).
JRE_PACKAGE="openjdk-17-jre-headless=17.0.*"
# The reverse proxy in front of TorchServe (handler/front.py): Debian 12's nginx 1.22.1 with its security
# updates. scripts/nginx.sh reads this line, so `make serve` runs the version the image runs.
NGINX_PACKAGE="nginx=1.22.1-9+deb12u*"
# Must match the chart's runAsUser/runAsGroup/fsGroup and handler/config.properties' allowed_urls,
# which names /home/model-server/model-store.
SERVE_UID=1000
SERVE_HOME=/home/model-server

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }
say() { echo "install.sh: $*" >&2; }

python_env() {
  local variant=${1:-} prefix=${2:-} dry_run=false without_pip=false flag
  local requirements=("--requirement=$ROOT/docker/requirements.txt")
  if [[ "$variant" != cpu && "$variant" != gpu ]] || [[ -z "$prefix" ]]; then usage; fi
  shift 2
  for flag in "$@"; do
    case "$flag" in
      --dry-run) dry_run=true ;;
      --without-pip) without_pip=true ;;
      --with-training) requirements+=("--requirement=$ROOT/docker/requirements-train.txt") ;;
      *) usage ;;
    esac
  done

  local index=${TORCH_INDEX_URL:-} cpu_only_torch=false
  if [[ "$variant" == cpu && -n "$index" ]]; then
    cpu_only_torch=true
  else
    if [[ "$variant" == cpu ]]; then
      say "warning: TORCH_INDEX_URL is not set, so the cpu variant gets torch's default build with its CUDA" \
        "libraries (it runs on a CPU; the image is ~4 GB larger). Set it to PyTorch's CPU wheel index for a CPU-only torch."
    fi
    requirements+=("--requirement=$ROOT/docker/requirements-cuda.txt")
  fi

  # Behind a TLS-intercepting proxy pip needs its CA: the Dockerfile mounts it as the secret "ca".
  if [[ -s /run/secrets/ca ]]; then export PIP_CERT=/run/secrets/ca; fi

  "${PYTHON:-python3}" -m venv --clear "$prefix"
  local py="$prefix/bin/python"
  # Wheels only: nothing is compiled, so the builder needs no compiler either.
  local pip=("$py" -m pip install --no-input --disable-pip-version-check --only-binary=:all:)
  # Resolve first, and refuse a set holding anything not pinned: it would float between builds.
  "${pip[@]}" --dry-run --quiet --report "$prefix/resolved.json" "${requirements[@]}"
  "$py" -I - "$prefix/resolved.json" "$ROOT"/docker/requirements*.txt <<'EOF'
import json, re, sys
def canonical(name): return re.sub(r"[-_.]+", "-", name).lower()
pinned = {canonical(line.split("==")[0]) for path in sys.argv[2:] for line in open(path) if "==" in line and not line.startswith("#")}
resolved = [item["metadata"]["name"] for item in json.load(open(sys.argv[1]))["install"]]
extra = sorted(name for name in resolved if canonical(name) not in pinned)
if extra:
    sys.exit(f"install.sh: resolved but not pinned in docker/requirements*.txt: {', '.join(extra)}")
EOF
  rm "$prefix/resolved.json"
  if $dry_run; then
    if $cpu_only_torch; then
      "${pip[@]}" --dry-run --quiet --no-deps --index-url "$index" "torch==$TORCH_VERSION"
    fi
    say "dry run: the $variant pins resolve"
    rm -rf "$prefix"
    return
  fi

  "${pip[@]}" "${requirements[@]}"
  if $cpu_only_torch; then
    # The CPU-only build declares no CUDA dependencies; its pure-Python ones are in requirements.txt.
    "${pip[@]}" --no-deps --index-url "$index" "torch==$TORCH_VERSION"
  fi
  # Triton is torch.compile's GPU code generator (0.9 GB): serving TorchScript and training eagerly never import
  # it, on a CPU or a GPU. It stays pinned, so the set resolves as torch declares it, and is then taken out;
  # pip check may name it and nothing else.
  "$py" -m pip uninstall --yes --quiet triton
  local check
  check="$("$py" -m pip check)" || [[ "$check" == "torch $TORCH_VERSION requires triton, which is not installed." ]] \
    || { echo "$check" >&2; exit 1; }
  say "pip check: no broken requirements (torch's triton is left out on purpose)"
  # What TorchServe's workers and the entrypoint import, and one TorchScript forward pass.
  "$py" -I -W ignore::FutureWarning -c '
import cassandra.cluster, numpy, PIL.Image, yaml, ts.model_service_worker, ts.torch_handler.base_handler, torch
model = torch.jit.script(torch.nn.Conv2d(1, 2, 3))
assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 2, 26, 26)
cuda = torch.version.cuda or "none"
print(f"install.sh: torch {torch.__version__} (CUDA build: {cuda}), TorchServe {ts.__version__}")
'
  if $without_pip; then
    "$py" -m pip uninstall --yes --quiet pip
  fi
}

training_packages() {
  local venv=${1:-} dir=${2:-}
  [[ -n "$venv" && -n "$dir" && $# == 2 ]] || usage
  if [[ -s /run/secrets/ca ]]; then export PIP_CERT=/run/secrets/ca; fi
  # The base image's pip, for the same Python 3.11 as the venv's; every dependency is pinned in the file.
  "${PYTHON:-python3}" -m pip install --no-input --disable-pip-version-check --only-binary=:all: --no-deps \
    --target "$dir" --requirement "$ROOT/docker/requirements-train.txt"
  "$venv/bin/python" -I -c '
import sys
sys.path.insert(0, sys.argv[1])
import matplotlib, matplotlib.pyplot, model_archiver.model_packaging
print(f"install.sh: training additions: matplotlib {matplotlib.__version__}, torch-model-archiver in {sys.argv[1]}")
' "$dir"
}

system_packages() {
  local dry_run=false
  case "${1:-}" in
    "") ;;
    --dry-run) dry_run=true ;;
    *) usage ;;
  esac
  if $dry_run; then
    apt-get install --simulate --no-install-recommends "$JRE_PACKAGE" "$NGINX_PACKAGE" >/dev/null
    say "dry run: $JRE_PACKAGE and $NGINX_PACKAGE resolve; would add user $SERVE_UID with $SERVE_HOME/{model-store,logs}"
    return
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  # The JRE's post-install step links its manual page there; slim images delete that directory.
  mkdir -p /usr/share/man/man1
  # nginx's package would start its service: nothing starts at build time (the entrypoint runs its own).
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  apt-get install --yes --no-install-recommends "$JRE_PACKAGE" "$NGINX_PACKAGE"
  rm /usr/sbin/policy-rc.d
  apt-get clean
  rm -rf /var/lib/apt/lists/*
  java -version 2>&1 | grep -q '"17\.' || { java -version; say "expected Java 17"; exit 1; }

  # A fixed uid, not a name: the chart's runAsUser names it, and runAsNonRoot can check a number.
  useradd --uid "$SERVE_UID" --user-group --create-home --home-dir "$SERVE_HOME" --shell /usr/sbin/nologin model-server
  # Owned by the user for `docker run`; in Kubernetes the chart mounts emptyDirs over them.
  install -d -o "$SERVE_UID" -g "$SERVE_UID" "$SERVE_HOME/model-store" "$SERVE_HOME/logs"
  # The image installs nothing at run time: no pip in the base image's Python (the venv has none either).
  # The python image's pip is pip's own; the Debian-built base's is Debian's package, which pip leaves.
  if dpkg-query --show --showformat='${Status}' python3-pip 2>/dev/null | grep -q installed; then
    apt-get purge --yes --quiet python3-pip python3-setuptools python3-wheel >/dev/null
  else
    python3 -m pip uninstall --yes --quiet pip setuptools wheel
  fi
  if python3 -m pip --version >/dev/null 2>&1; then say "pip is still in the system Python"; exit 1; fi
}

case "${1:-}" in
  python) shift; python_env "$@" ;;
  training) shift; training_packages "$@" ;;
  system) shift; system_packages "$@" ;;
  *) usage ;;
esac
