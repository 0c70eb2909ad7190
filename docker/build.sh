#!/usr/bin/env bash
# Build the serving image (Dockerfile) where a Docker engine runs.
#
#   docker/build.sh cpu|gpu [--with-model|--train]
#
# Tags IMAGE:VERSION-VARIANT (IMAGE defaults to mnist-serve, VERSION is pyproject.toml's), with
# "-model" appended for --with-model, which builds in MODEL_ARCHIVE (default artifacts/model-store/mnist.mar,
# from make archive),
# and "-train" for --train, the training image (charts/mnist-train).
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

say() { echo "build.sh: $*" >&2; }
# An engine: the user's where one runs; on Debian as root one is installed and started (one error line otherwise).
"$ROOT/scripts/docker-engine.sh"
# --with-model: MODEL_ARCHIVE (default: make archive's) is copied to the one staging path .dockerignore
# lets into the build context, and removed after the build.
model_archive=${MODEL_ARCHIVE:-$ROOT/artifacts/model-store/mnist.mar}
staged=artifacts/.image-model/mnist.mar
if [[ "$target" == with-model ]]; then
  if [[ ! -f "$model_archive" ]]; then
    echo "error: no $model_archive to build in; run make archive first" >&2
    exit 1
  fi
  mkdir -p "$ROOT/${staged%/*}"
  cp "$model_archive" "$ROOT/$staged"
  trap 'rm -rf "$ROOT/${staged%/*}"' EXIT
fi

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml")"
tag="${IMAGE:-mnist-serve}:${version}-${variant}${suffix}"
# Which commit the image was built from, readable with docker inspect (the image has no .git).
revision="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
# Without a CPU-only torch index the cpu venv is the gpu one (torch's default build): one layer for both.
venv_variant=$variant
if [[ "$variant" == cpu && -z "${TORCH_INDEX_URL:-}" ]]; then
  venv_variant=gpu
  say "TORCH_INDEX_URL is not set: the cpu image gets torch's default build with its CUDA libraries (runs on a CPU; ~4 GB larger)"
fi
args=(--build-arg MODEL_ARCHIVE="$staged" --build-arg VARIANT="$variant" --build-arg VENV_VARIANT="$venv_variant" --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
  --build-arg GIT_COMMIT="$revision")

# Base images: PYTHON_IMAGE / CUDA_IMAGE when given; else the Dockerfile's defaults where they can be
# had, and where not (no image registry reachable), a base built from Debian packages and a GPU image
# without the driver forward-compatibility libraries.
default_of() { sed -n "s/^ARG $1=//p" "$ROOT/Dockerfile"; }
available() { docker image inspect "$1" >/dev/null 2>&1 || docker pull --quiet "$1" >/dev/null 2>&1; }
python_image=${PYTHON_IMAGE:-$(default_of PYTHON_IMAGE)}
if [[ -z "${PYTHON_IMAGE:-}" ]] && ! available "$python_image"; then
  say "$python_image cannot be pulled here: using a Debian 12 + Python 3.11 base built from Debian packages"
  python_image="$("$ROOT/scripts/base-image.sh" | tail -n 1)"
fi
args+=(--build-arg PYTHON_IMAGE="$python_image")
if [[ "$variant" == cpu ]]; then
  args+=(--build-arg CUDA_COMPAT=skip)
else
  cuda_image=${CUDA_IMAGE:-$(default_of CUDA_IMAGE)}
  if available "$cuda_image"; then
    args+=(--build-arg CUDA_IMAGE="$cuda_image")
  else
    say "skipped the CUDA driver forward-compatibility libraries: $cuda_image cannot be pulled here." \
      "This image needs an NVIDIA driver >= 580 (CUDA 13) on the GPU node; build where it can be pulled for older drivers."
    args+=(--build-arg CUDA_COMPAT=skip)
  fi
fi
# Behind a TLS-intercepting proxy pip needs the proxy's CA: the host's bundle, as a build secret.
ca_bundle=${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [[ -s "$ca_bundle" ]]; then args+=(--secret "id=ca,src=$ca_bundle"); fi

# BuildKit (the Dockerfile's cache and secret mounts): buildx where installed, else a client with it
# built in (Debian's docker.io puts one at /usr/bin/docker; a newer client without buildx lacks it).
if docker buildx version >/dev/null 2>&1; then
  build=(docker buildx build --load)
elif [[ -x /usr/bin/docker ]]; then
  build=(/usr/bin/docker build)
else
  build=(docker build)
fi
# Marks this project's images, so the prune below finds them and no one else's.
title=org.opencontainers.image.title=mnist-serve
DOCKER_BUILDKIT=1 "${build[@]}" "$ROOT" --file "$ROOT/Dockerfile" --target "$target" "${args[@]}" \
  --label "$title" --label org.opencontainers.image.revision="$revision" \
  --label org.opencontainers.image.version="$version" --tag "$tag"
# The image this one replaced under its tag is left with none; with a changed venv that is 5 GB a build.
# Only this project's untagged images go (by their title label), and none a container still uses.
say "superseded mnist-serve images removed: $(docker image prune --force --filter "label=$title" | sed -n "s/^Total reclaimed space: //p") freed"
echo "$tag"
