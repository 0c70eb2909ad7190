#!/usr/bin/env bash
# Check the Helm charts offline, the serving chart (charts/mnist-serve) and the training chart
# (charts/mnist-train): `helm lint --strict` and `helm template` with the default values and each values
# file, every rendered object validated against Kubernetes 1.36's JSON schemas (kubernetes-validate,
# strict: unknown fields fail too), then the tests on the rendered output (tests/test_chart.py,
# tests/test_train_chart.py). helm comes from scripts/install-k8s-tools.sh; Python from the project venv.
#
#   scripts/chart-lint.sh
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/charts/mnist-serve"
TRAIN_CHART="$ROOT/charts/mnist-train"
HELM="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}/bin/helm"
PY="$ROOT/.venv/bin/python"
KUBE_VERSION=1.36.0

"$ROOT/scripts/install-k8s-tools.sh" helm
[[ -x "$PY" ]] || { echo "error: no $PY; run make venv first" >&2; exit 1; }

rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT

# chart|name|helm's value flags. "everything" switches every optional part on, so it is checked too.
cases=(
  "$CHART|default|"
  "$CHART|kind|--values=$CHART/values-kind.yaml"
  "$CHART|eks-gpu|--values=$CHART/values-eks-gpu.yaml"
  "$CHART|everything|--values=$CHART/values-eks-gpu.yaml --set=metrics.serviceMonitor.enabled=true --set=gpu.runtimeClassName=nvidia --set=networkPolicy.inferenceFrom[0].namespaceSelector.matchLabels.name=ingress --set=networkPolicy.egressTo[0].ipBlock.cidr=10.0.0.0/8 --set=serviceAccount.annotations.eks\.amazonaws\.com/role-arn=arn:aws:iam::123456789012:role/mnist-serve"
  "$TRAIN_CHART|train-default|"
  "$TRAIN_CHART|train-kind|--values=$TRAIN_CHART/values-kind.yaml"
  "$TRAIN_CHART|train-eks-gpu|--values=$TRAIN_CHART/values-eks-gpu.yaml"
  "$TRAIN_CHART|train-everything|--values=$TRAIN_CHART/values-eks-gpu.yaml --set=ranks=4 --set=gpu.runtimeClassName=nvidia --set=networkPolicy.egressTo[0].ipBlock.cidr=10.0.0.0/8 --set=serviceAccountName=mnist-train"
)
for case in "${cases[@]}"; do
  IFS='|' read -r chart name flag_text <<<"$case"
  read -r -a flags <<<"$flag_text"
  echo "== ${chart##*/}: $name"
  # The symlink warning (files/config.properties -> handler/config.properties) is expected; errors are not.
  "$HELM" lint --strict "$chart" "${flags[@]}" 2> >(grep -v 'found symbolic link' >&2)
  "$HELM" template "${chart##*/}" "$chart" --namespace serving --kube-version "$KUBE_VERSION" "${flags[@]}" \
    >"$rendered/$name.yaml" 2> >(grep -v 'found symbolic link' >&2)
  # ServiceMonitor is the Prometheus operator's CRD: no built-in schema, reported as WARN.
  "$ROOT/.venv/bin/kubernetes-validate" --kubernetes-version "$KUBE_VERSION" --strict --quiet "$rendered/$name.yaml"
  echo "$(grep -c "^kind:" "$rendered/$name.yaml") objects rendered; all valid against Kubernetes $KUBE_VERSION but the CRDs warned about above"
done

exec "$PY" -m pytest "$ROOT/tests/test_chart.py" "$ROOT/tests/test_train_chart.py" -q
