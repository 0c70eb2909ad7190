#!/usr/bin/env bash
# Build the serving image (Dockerfile) where a Docker engine runs.
#
#   docker/build.sh cpu|gpu [--with-model|--train]
#
# Tags IMAGE:VERSION-VARIANT (IMAGE defaults to mnist-serve, VERSION is pyproject.toml's), with
# "-model" appended for --with-model, which builds in artifacts/model-store/mnist.mar (make archive),
# and "-train" for --train, the training image (k8s/train-job.yaml).
# TORCH_INDEX_URL, when set, is passed on: the cpu variant then gets torch's CPU-only build.
# Prints the tag it built as the last line.
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
variant=${1:-}
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }
[[ "$variant" == cpu || "$variant" == gpu ]] || usage
target=serve suffix=""
case "${2:-}" in
  "") ;;
  --with-model) target=with-model suffix=-model ;;
  --train) target=train suffix=-train ;;
  *) echo "unknown option '$2' (want --with-model or --train)" >&2; exit 2 ;;
esac

# Here a docker CLI may exist without an engine behind it: say so plainly instead of a long error.
if ! docker info >/dev/null 2>&1; then
  echo "error: building the image needs a running Docker engine ('docker info' fails here); run this where Docker runs" >&2
  exit 1
fi
if [[ "$target" == with-model && ! -f "$ROOT/artifacts/model-store/mnist.mar" ]]; then
  echo "error: no artifacts/model-store/mnist.mar to build in; run make archive first" >&2
  exit 1
fi

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml")"
tag="${IMAGE:-mnist-serve}:${version}-${variant}${suffix}"
# Which commit the image was built from, readable with docker inspect (the image has no .git).
revision="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
DOCKER_BUILDKIT=1 docker build "$ROOT" --file "$ROOT/Dockerfile" --target "$target" \
  --build-arg VARIANT="$variant" --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-}" --build-arg GIT_COMMIT="$revision" \
  --label org.opencontainers.image.revision="$revision" --label org.opencontainers.image.version="$version" \
  --tag "$tag"
echo "$tag"
