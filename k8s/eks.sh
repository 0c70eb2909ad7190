#!/usr/bin/env bash
# mnist-serve on EKS, from an empty AWS account to GPU pods answering and back to nothing (docs/eks.md):
#
#   k8s/eks.sh up                  the cluster of k8s/eks-cluster.yaml (eksctl) and the ECR repository
#   k8s/eks.sh push                build the GPU serving and training images, push both to ECR
#   k8s/eks.sh secrets BUNDLE.zip  namespace, the Astra bundle Secret, and two tokens for two roles:
#                                  the serving pods' (reader) and the training Job's (writer), read without echo
#   k8s/eks.sh train [RANKS]       the training run on the GPU nodes (charts/mnist-train, values-eks-gpu.yaml, the ECR
#                                  training image; RANKS default 2) through scripts/train-cluster.sh: logs, the version
#   k8s/eks.sh install             helm install the chart with values-eks-gpu.yaml and the ECR image, then helm test
#   k8s/eks.sh down [--yes]        helm uninstall, the namespace, the ECR repository and its images, the cluster
#
# The region and the cluster's name are k8s/eks-cluster.yaml's, the one place to change them. DRY_RUN=1 prints
# each AWS, Kubernetes and Docker command instead of running it. Needs the AWS CLI (v2), eksctl (0.201 or later:
# EKS add-ons with configurationValues), kubectl, helm and Docker, all on PATH.
set -o errexit -o nounset -o pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
CLUSTER_FILE="$HERE/eks-cluster.yaml"
CHART="$ROOT/charts/mnist-serve"
NAMESPACE="${NAMESPACE:-mnist}"
RELEASE="${RELEASE:-mnist-serve}"
REPOSITORY="mnist-serve"
BUNDLE_SECRET="mnist-serve-astra-bundle"
READER_TOKEN_SECRET="mnist-serve-astra-token"  # values-eks-gpu.yaml's astra.tokenSecret
WRITER_TOKEN_SECRET="mnist-train-astra-token"  # the training Job's
DRY_RUN="${DRY_RUN:-}"

fail() {
  echo "eks: error: $*" >&2
  exit 1
}

run() { # run COMMAND...: runs it, or with DRY_RUN prints it, quoted as a shell would need it
  if [[ -n "$DRY_RUN" ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

cluster_setting() { # cluster_setting KEY: metadata.KEY of k8s/eks-cluster.yaml (name, region)
  local value
  value="$(sed -n "/^metadata:/,/^[a-z]/s/^  $1: *\"\{0,1\}\([^\"#]*\)\"\{0,1\} *\(#.*\)\{0,1\}$/\1/p" "$CLUSTER_FILE")"
  [[ -n "$value" ]] || fail "no metadata.$1 in $CLUSTER_FILE"
  echo "$value"
}

app_version() {
  sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$CHART/Chart.yaml"
}

require_tools() { # require_tools TOOL...: each on PATH (not checked in a dry run, which runs none)
  [[ -n "$DRY_RUN" ]] && return
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || fail "$tool is not on PATH (docs/eks.md#tools says which versions)"
  done
}

ecr_uri() { # the repository's URI, e.g. ACCOUNT.dkr.ecr.REGION.amazonaws.com/mnist-serve
  if [[ -n "$DRY_RUN" ]]; then
    echo "ECR_URI"
    return
  fi
  aws ecr describe-repositories --region "$REGION" --repository-names "$REPOSITORY" \
    --query 'repositories[0].repositoryUri' --output text
}

up() {
  require_tools aws eksctl kubectl
  run eksctl create cluster -f "$CLUSTER_FILE"
  if [[ -z "$DRY_RUN" ]] && aws ecr describe-repositories --region "$REGION" --repository-names "$REPOSITORY" \
    >/dev/null 2>&1; then
    echo "eks: the ECR repository $REPOSITORY is there already"
  else
    # Scanned on push; tags immutable, so a pushed tag always means the same image.
    run aws ecr create-repository --region "$REGION" --repository-name "$REPOSITORY" \
      --image-scanning-configuration scanOnPush=true --image-tag-mutability IMMUTABLE
  fi
  run kubectl get nodes -L eks.amazonaws.com/nodegroup \
    -o "custom-columns=NAME:.metadata.name,GROUP:.metadata.labels.eks\.amazonaws\.com/nodegroup,GPUS:.status.allocatable.nvidia\.com/gpu"
}

push() {
  require_tools aws docker make
  local uri tag version
  uri="$(ecr_uri)"
  version="$(app_version)"
  run make -C "$ROOT" image-gpu image-train
  aws_login "$uri"
  for tag in "$version-gpu" "$version-gpu-train"; do
    run docker tag "mnist-serve:$tag" "$uri:$tag"
    run docker push "$uri:$tag"
  done
}

aws_login() { # aws_login URI: docker login to the URI's registry with a 12-hour ECR password, never echoed
  if [[ -n "$DRY_RUN" ]]; then
    echo "aws ecr get-login-password --region $REGION | docker login --username AWS --password-stdin ${1%%/*}"
    return
  fi
  aws ecr get-login-password --region "$REGION" | docker login --username AWS --password-stdin "${1%%/*}"
}

secrets() {
  local bundle="${1:-}"
  [[ -n "$bundle" ]] || fail "secrets needs the secure connect bundle: k8s/eks.sh secrets secure-connect-mnist.zip"
  [[ -n "$DRY_RUN" || -f "$bundle" ]] || fail "$bundle: no such file (the Astra console's Connect page downloads it)"
  require_tools kubectl
  run kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | apply
  run kubectl -n "$NAMESPACE" create secret generic "$BUNDLE_SECRET" \
    --from-file="secure-connect-bundle.zip=$bundle" --dry-run=client -o yaml | apply
  token_secret "$READER_TOKEN_SECRET" "the serving pods' token (a role that reads the registry)"
  token_secret "$WRITER_TOKEN_SECRET" "the training Job's token (a role that writes the tables and the registry)"
}

apply() { # the Secret or namespace on stdin, created or replaced (so secrets can run again)
  if [[ -n "$DRY_RUN" ]]; then
    sed 's/$/ | kubectl apply -f -/' # the printed command it would have piped
  else
    kubectl apply -f - >/dev/null
  fi
}

token_secret() { # token_secret NAME PROMPT: a token typed without echo, straight into a Secret, never in a file
  if [[ -n "$DRY_RUN" ]]; then
    echo "kubectl -n $NAMESPACE create secret generic $1 --from-file=token=<(the token you type) | kubectl apply -f -"
    return
  fi
  local token
  read -rsp "Astra DB token for $2 (AstraCS:...): " token
  echo
  [[ "$token" == AstraCS:* ]] || fail "that is not an Astra application token (they start with AstraCS:)"
  kubectl -n "$NAMESPACE" create secret generic "$1" --from-file=token=<(printf %s "$token") \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  unset token
  echo "eks: Secret $1 written"
}

train() {
  local ranks="${1:-2}"
  [[ "$ranks" =~ ^[1-9][0-9]*$ ]] || fail "train $ranks: want a number of ranks, 1 or more (one per GPU node)"
  require_tools aws kubectl
  local uri
  uri="$(ecr_uri)"
  run "$ROOT/scripts/train-cluster.sh" --ranks "$ranks" --namespace "$NAMESPACE" \
    --values "$ROOT/charts/mnist-train/values-eks-gpu.yaml" -- --set "image.repository=$uri"
}

install() {
  require_tools aws helm kubectl
  local uri
  uri="$(ecr_uri)"
  run helm upgrade --install "$RELEASE" "$CHART" --namespace "$NAMESPACE" \
    --values "$CHART/values-eks-gpu.yaml" --set "image.repository=$uri" --wait --timeout 15m
  run helm test "$RELEASE" --namespace "$NAMESPACE" --logs
}

down() {
  require_tools aws eksctl helm kubectl
  if [[ "${1:-}" != --yes && -z "$DRY_RUN" ]]; then
    local answer
    read -rp "Delete the release, namespace $NAMESPACE, ECR repository $REPOSITORY with its images and cluster $NAME in $REGION? [y/N] " answer
    [[ "$answer" == [yY]* ]] || fail "nothing deleted"
  fi
  run helm uninstall "$RELEASE" --namespace "$NAMESPACE" --ignore-not-found --wait
  # The helm test pod is a hook, which helm uninstall leaves behind: the namespace takes it.
  run kubectl delete namespace "$NAMESPACE" --ignore-not-found --wait
  run aws ecr delete-repository --region "$REGION" --repository-name "$REPOSITORY" --force
  # Load balancers and volumes the cluster made go with it; --wait returns once CloudFormation has deleted it.
  run eksctl delete cluster -f "$CLUSTER_FILE" --wait
}

usage() {
  sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

main() {
  local command="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$command" in
    up | push | install) [[ $# -eq 0 ]] || fail "$command takes no arguments" ;;
    secrets | down | train) ;;
    -h | --help | help)
      usage
      return
      ;;
    *)
      usage >&2
      fail "${command:-no command}: expected up, push, secrets, train, install or down"
      ;;
  esac
  NAME="$(cluster_setting name)"
  REGION="$(cluster_setting region)"
  echo "eks: cluster $NAME in $REGION ($CLUSTER_FILE), namespace $NAMESPACE" >&2
  "$command" "$@"
}

main "$@"
