#!/usr/bin/env bash
# A training run on the cluster of the current kube context, in one command (make train-cluster): the chart
# charts/mnist-train installed with helm (an Indexed Job of torchrun ranks), where to follow its logs, a wait
# for the Job's end, and the version rank 0 published, as the last line.
#
#   scripts/train-cluster.sh [--ranks N] [--values FILE] [--namespace NS] [--release NAME]
#                            [--train-flags "FLAGS"] [-- HELM_FLAG...]
#
#   --ranks N          pods, one rank each (default: the values file's; 1 in values.yaml)
#   --values FILE      a values file of the chart, e.g. charts/mnist-train/values-eks-gpu.yaml or values-kind.yaml
#   --namespace NS     where the Job runs (default: the kube context's namespace); it holds the database Secrets
#   --release NAME     the helm release (default: mnist-train)
#   --train-flags F    extra flags for `python -m training train`, e.g. "--epochs 3"
#   -- HELM_FLAG...    passed to helm as they are, e.g. --set image.repository=ECR_URI
#
# A Job runs once: a finished Job of the same release (and its pods) is deleted first. Exits 0 once a version is
# published; 1 with the reason (the Job's condition and each failed rank's last lines) when the run failed.
# helm and kubectl: the project's pinned ones in ${MNIST_SERVE_CACHE:-~/.cache/mnist-serve}/bin, else the PATH's.
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/charts/mnist-train"
BIN="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}/bin"
# Seconds between looks at the Job while it runs.
POLL_SECONDS=5

ranks="" values_file="" namespace="" release=mnist-train train_flags="" set_train_flags=false helm_flags=()
job="" ranks_shown="" values=()

help_text() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
usage() { help_text >&2; exit 2; }
say() { echo "train-cluster: $*" >&2; }
fail() { echo "train-cluster: error: $*" >&2; exit 1; }

parse_arguments() {
  while (($#)); do
    case "$1" in
      --ranks) ranks=${2:?--ranks needs a number}; shift 2 ;;
      --values) values_file=${2:?--values needs a file}; shift 2 ;;
      --namespace | -n) namespace=${2:?--namespace needs a name}; shift 2 ;;
      --release) release=${2:?--release needs a name}; shift 2 ;;
      --train-flags) train_flags=${2-}; set_train_flags=true; shift 2 ;;
      --) shift; helm_flags=("$@"); break ;;
      -h | --help) help_text; exit 0 ;;
      *) echo "train-cluster: unknown argument '$1'" >&2; usage ;;
    esac
  done
  if [[ -n "$ranks" && ! "$ranks" =~ ^[0-9]+$ ]]; then
    fail "--ranks $ranks: want a whole number of pods, 1 or more"
  fi
  [[ -z "$values_file" || -f "$values_file" ]] || fail "$values_file: no such values file (charts/mnist-train has values-kind.yaml and values-eks-gpu.yaml)"
}

find_tools() { # helm and kubectl: the pinned ones, else the PATH's
  [[ -x "$BIN/helm" ]] || "$ROOT/scripts/install-k8s-tools.sh" helm >&2
  HELM="$BIN/helm"
  if [[ -x "$BIN/kubectl" ]]; then
    KUBECTL="$BIN/kubectl"
  else
    KUBECTL="$(command -v kubectl)" ||
      fail "no kubectl: install one within a minor version of your cluster's, or build the pinned one (scripts/install-k8s-tools.sh kube)"
  fi
}

k() { "$KUBECTL" --namespace "$namespace" "$@"; }

choose_cluster() { # the kube context and namespace, said before anything changes
  local context
  context="$("$KUBECTL" config current-context 2>/dev/null)" ||
    fail "no current kube context: point KUBECONFIG at your cluster (kind get kubeconfig, aws eks update-kubeconfig)"
  if [[ -z "$namespace" ]]; then
    namespace="$("$KUBECTL" config view --minify --output 'jsonpath={..namespace}')"
    namespace=${namespace:-default}
  fi
  say "cluster: kube context $context, namespace $namespace, release $release"
}

chart_values() { # values: the helm flags of this run's values, in the order they take effect
  values=()
  if [[ -n "$values_file" ]]; then values+=(--values "$values_file"); fi
  if [[ -n "$ranks" ]]; then values+=(--set "ranks=$ranks"); fi
  if [[ "$set_train_flags" == true ]]; then values+=(--set-string "trainFlags=$train_flags"); fi
  values+=("${helm_flags[@]}")
}

install() {
  local rendered
  chart_values
  # Rendered first: a value the schema refuses stops here, before a finished Job is deleted.
  rendered="$("$HELM" template "$release" "$CHART" --namespace "$namespace" "${values[@]}" --show-only templates/job.yaml)"
  job="$(sed -n 's/^  name: //p' <<<"$rendered" | head -n 1)"
  ranks_shown="$(sed -n 's/^  completions: //p' <<<"$rendered" | head -n 1)"
  [[ -n "$job" ]] || fail "helm template rendered no Job from $CHART"
  # A Job's pods cannot be changed, and a finished one does not run again: the previous run goes, pods and all.
  if k get job "$job" >/dev/null 2>&1; then
    say "deleting the previous run's Job $job (and its pods)"
    k delete job "$job" --cascade=foreground --wait --timeout=5m >/dev/null
  fi
  "$HELM" upgrade --install "$release" "$CHART" --namespace "$namespace" "${values[@]}" >/dev/null
  say "Job $job started with $ranks_shown rank(s)"
}

show_where_the_logs_are() {
  local index0="batch.kubernetes.io/job-name=$job,batch.kubernetes.io/job-completion-index=0"
  say "follow rank 0: kubectl --namespace $namespace logs -f -l $index0"
  say "every rank:    kubectl --namespace $namespace logs -f -l batch.kubernetes.io/job-name=$job --prefix --max-log-requests $ranks_shown"
  say "the pods:      kubectl --namespace $namespace get pods -l batch.kubernetes.io/job-name=$job -o wide"
}

job_state() { # Complete, Failed or nothing yet: the Job's outcome, with its reason and message. FailureTarget
  # counts as Failed: the Job controller has decided, and is stopping the other ranks before it says Failed.
  k get job "$job" --output \
    'jsonpath={range .status.conditions[?(@.status=="True")]}{.type}{"|"}{.reason}{"|"}{.message}{"\n"}{end}' |
    grep -E '^(Complete|Failed|FailureTarget)\|' | sed 's/^FailureTarget|/Failed|/' | head -n 1 || true
}

pods_summary() { # e.g. "2 Running" or "1 Running, 1 Pending (0/4 nodes are available: 2 Insufficient nvidia.com/gpu...)"
  k get pods -l "batch.kubernetes.io/job-name=$job" --output \
    'jsonpath={range .items[*]}{.status.phase}{"|"}{.status.conditions[?(@.type=="PodScheduled")].message}{"\n"}{end}' |
    awk -F'|' '{ count[$1]++; if ($2 != "") why[$1] = $2 } END {
      n = 0; for (phase in count) { printf "%s%d %s", (n++ ? ", " : ""), count[phase], phase; if (phase in why) printf " (%s)", why[phase] }
    }'
}

wait_for_the_end() { # until the Job is Complete or Failed; the pods' phases whenever they change
  local state="" pods="" shown=""
  while [[ -z "$state" ]]; do
    pods="$(pods_summary)"
    if [[ -n "$pods" && "$pods" != "$shown" ]]; then
      say "ranks: $pods"
      shown=$pods
    fi
    sleep "$POLL_SECONDS"
    state="$(job_state)"
  done
  printf '%s\n' "$state"
}

show_failure() { # the Job's reason, and each failed rank's termination message (its own line or its log's end)
  local state=$1
  say "the run failed: ${state#Failed|}"
  k get pods -l "batch.kubernetes.io/job-name=$job" --output \
    'jsonpath={range .items[?(@.status.phase=="Failed")]}{.metadata.name}{" (rank "}{.metadata.labels.batch\.kubernetes\.io/job-completion-index}{"):\n"}{.status.containerStatuses[0].state.terminated.message}{"\n"}{end}' |
    tail -n 40 >&2
  say "nothing was published by this run; the logs: kubectl --namespace $namespace logs -l batch.kubernetes.io/job-name=$job --prefix"
}

published_line() { # rank 0's "published version N: ..." line: its termination message, else its log
  local selector="batch.kubernetes.io/job-name=$job,batch.kubernetes.io/job-completion-index=0" line
  line="$(k get pods -l "$selector" --field-selector=status.phase=Succeeded --output \
    'jsonpath={.items[*].status.containerStatuses[0].state.terminated.message}' | grep -m 1 '^published version ' || true)"
  if [[ -z "$line" ]]; then
    line="$(k logs -l "$selector" --tail=200 2>/dev/null | grep '^published version ' | tail -n 1 || true)"
  fi
  printf '%s\n' "$line"
}

main() {
  parse_arguments "$@"
  find_tools
  choose_cluster
  install
  show_where_the_logs_are
  local state line
  state="$(wait_for_the_end)"
  if [[ "$state" == Failed* ]]; then
    show_failure "$state"
    exit 1
  fi
  line="$(published_line)"
  [[ -n "$line" ]] || fail "Job $job completed, but rank 0 said no 'published version' line: kubectl --namespace $namespace logs -l batch.kubernetes.io/job-name=$job,batch.kubernetes.io/job-completion-index=0"
  say "serve it: mnist-registry promote VERSION --deployment deployment/mnist-serve --namespace $namespace"
  echo "$line"
}

main "$@"
