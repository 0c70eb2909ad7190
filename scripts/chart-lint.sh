#!/usr/bin/env bash
# Check the Helm chart offline: `helm lint --strict` and `helm template` with the default values and
# each values file, every rendered object validated against Kubernetes 1.36's JSON schemas
# (kubernetes-validate, strict: unknown fields fail too), then the tests on the rendered output
# (tests/test_chart.py). helm comes from scripts/install-k8s-tools.sh; Python from the project venv.
#
#   scripts/chart-lint.sh
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/charts/mnist-serve"
HELM="${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}/bin/helm"
PY="$ROOT/.venv/bin/python"
KUBE_VERSION=1.36.0

"$ROOT/scripts/install-k8s-tools.sh" helm
[[ -x "$PY" ]] || { echo "error: no $PY; run make venv first" >&2; exit 1; }

rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT

# name, then helm's value flags. "everything" switches every optional part on, so it is checked too.
cases=(
  "default|"
  "kind|--values=$CHART/values-kind.yaml"
  "eks-gpu|--values=$CHART/values-eks-gpu.yaml"
  "everything|--values=$CHART/values-eks-gpu.yaml --set=metrics.serviceMonitor.enabled=true --set=gpu.runtimeClassName=nvidia --set=networkPolicy.inferenceFrom[0].namespaceSelector.matchLabels.name=ingress --set=networkPolicy.egressTo[0].ipBlock.cidr=10.0.0.0/8 --set=serviceAccount.annotations.eks\.amazonaws\.com/role-arn=arn:aws:iam::123456789012:role/mnist-serve"
)
for case in "${cases[@]}"; do
  name=${case%%|*}
  read -r -a flags <<<"${case#*|}"
  echo "== $name"
  # The symlink warning (files/config.properties -> handler/config.properties) is expected; errors are not.
  "$HELM" lint --strict "$CHART" "${flags[@]}" 2> >(grep -v 'found symbolic link' >&2)
  "$HELM" template mnist-serve "$CHART" --namespace serving --kube-version "$KUBE_VERSION" "${flags[@]}" \
    >"$rendered/$name.yaml" 2> >(grep -v 'found symbolic link' >&2)
  # ServiceMonitor is the Prometheus operator's CRD: no built-in schema, reported as WARN.
  "$ROOT/.venv/bin/kubernetes-validate" --kubernetes-version "$KUBE_VERSION" --strict --quiet "$rendered/$name.yaml"
  echo "$(grep -c "^kind:" "$rendered/$name.yaml") objects rendered; all valid against Kubernetes $KUBE_VERSION but the CRDs warned about above"
done

exec "$PY" -m pytest "$ROOT/tests/test_chart.py" -q
