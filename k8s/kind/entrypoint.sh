#!/usr/bin/env bash
# In front of kind's node entrypoint, in the node image k8s/kind/node-image.sh builds: two fixes a node needs
# where Docker cannot run it privileged (k8s/kind-smoke.sh then starts it with explicit capabilities),
# each applied only when this container shows the need, and said in one line of the node's log.
set -o errexit -o nounset -o pipefail

say() { echo "mnist-serve node: $*"; }

# Unprivileged on cgroup v1, Docker mounts the cgroup hierarchies read-only; kubelet and containerd write them.
if [[ ! -f /sys/fs/cgroup/cgroup.controllers ]]; then
  read_only="$(findmnt --raw --noheadings --types cgroup --output TARGET,OPTIONS | awk '$2 ~ /(^|,)ro(,|$)/ { print $1 }')"
  if [[ -n "$read_only" ]]; then
    say "cgroup v1 hierarchies mounted read-only (not privileged): remounting them read-write"
    for target in $read_only; do mount -o remount,bind,rw "$target"; done
  fi
fi

# Without CAP_SYS_RESOURCE no process here may lower an oom_score_adj; containerd must not try for pods.
effective="$(awk '/^CapEff:/ { print $2 }' /proc/self/status)"
if (((16#$effective >> 24 & 1) == 0)); then
  say "no CAP_SYS_RESOURCE: containerd's restrict_oom_score_adj on"
  sed -i 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' /etc/containerd/config.toml
fi

exec /usr/local/bin/entrypoint "$@"
