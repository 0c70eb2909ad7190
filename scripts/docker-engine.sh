#!/usr/bin/env bash
# Makes sure a Docker engine answers. Where one runs (a user's Docker, a CI service) it is used and
# nothing is changed. Where none does and this is Debian with root, Debian's docker.io is installed
# and dockerd started in the background, left running, its log in the cache.
#
#   scripts/docker-engine.sh        (make image and the image tests call it)
#
# Prints one line naming the engine that answers, or one error line and exits 1.
set -o errexit -o nounset -o pipefail

CACHE="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}"
# Debian 12's engine (20.10: BuildKit built into its client, which the Dockerfile's cache mounts need).
PACKAGE="docker.io=20.10.24+dfsg1-*"
LOG="$CACHE/dockerd.log"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

say() { echo "docker-engine: $*" >&2; }
fail() { echo "error: $*" >&2; exit 1; }
answers() { docker info --format '{{.ServerVersion}}' 2>/dev/null; }

# A machine started again from its disk (a VM restored from a snapshot, a CI runner) keeps /run's pid files
# but none of their processes, and the PIDs get reused: dockerd refuses to start over a pid file whose PID is
# alive, and it takes a live containerd.pid for its containerd and waits 60 s for a socket nobody opens. So a
# pid file counts only if its PID runs the program it names.
forget_stale_pidfile() { # FILE PROGRAM
  local pid
  [[ -f $1 ]] || return 0
  pid="$(<"$1")"
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] && return 0
  say "removing $1: pid ${pid:-(none)} is not a running $2 (left by a machine that stopped)"
  rm -f "$1"
}

if version="$(answers)"; then
  say "Docker engine $version answers${DOCKER_HOST:+ at $DOCKER_HOST}"
  exit 0
fi
# Someone pointed the client at an engine on purpose: starting another one would not be what they asked.
[[ -z "${DOCKER_HOST:-}" ]] || fail "no Docker engine answers at DOCKER_HOST=$DOCKER_HOST ('docker info' fails)"
if [[ $(id -u) != 0 ]] || ! grep -q '^ID=debian' /etc/os-release 2>/dev/null; then
  fail "no Docker engine answers ('docker info' fails); start one (this script installs one itself only on Debian as root)"
fi

"$HERE/apt-install.sh" dockerd "$PACKAGE"
mkdir -p "$CACHE"
forget_stale_pidfile /var/run/docker.pid dockerd
forget_stale_pidfile /var/run/docker/containerd/containerd.pid containerd
# Every change of the image's Python environment leaves another ~5 GB builder layer in BuildKit's cache,
# which Docker never removes by itself: an engine started here has BuildKit collect it down to 15 GB after
# builds (scripts/dockerd.json; the current venv, its copy in the images and the small layers fit). A
# daemon.json the machine already has is used as it is.
# (A copy in the cache: dockerd outlives the checkout that started it.)
config=()
if [[ ! -e /etc/docker/daemon.json ]]; then
  cp "$HERE/dockerd.json" "$CACHE/dockerd.json"
  config=(--config-file "$CACHE/dockerd.json")
fi
say "starting dockerd${config:+ with ${config[1]}} (log: $LOG)"
# Its own session, so it outlives this script and the make or pytest run that called it.
setsid dockerd "${config[@]}" >>"$LOG" 2>&1 </dev/null &
for _ in $(seq 60); do
  if version="$(answers)"; then
    say "Docker engine $version answers (started here, left running)"
    exit 0
  fi
  sleep 1
done
tail -n 20 "$LOG" >&2
fail "dockerd started but did not answer within 60 s (log: $LOG)"
