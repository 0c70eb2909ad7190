#!/usr/bin/env bash
# A kind node image with the serving image (and the training image) already in its containerd
# (k8s/kind-smoke.sh), so that a new cluster needs no `kind load`: that streams the whole image into the node
# and hashes it on every run (~2 min for the 5 GB CPU image, torch's CUDA build), where this is done once per
# serving image.
#
#   k8s/kind/preload.sh NODE_IMAGE SERVING_IMAGE [IMAGE...]     prints the preloaded node image's name as its
#                                                               last line
#
# The IMAGEs are preloaded beside the serving image; the training image shares all but its last layers with it,
# and `docker save` writes a shared layer once.
#
# How: containerd of NODE_IMAGE, in a plain container of it, imports `docker save SERVING_IMAGE IMAGE...` with
# --no-unpack (content only, as the node image's own control plane images are: the blobs are plain files,
# where unpacked layers would carry overlay whiteouts a Docker layer cannot hold), and the container is
# committed with NODE_IMAGE's entrypoint. kubelet's containerd unpacks it when the first pod starts.
# The name carries a hash of the images' IDs, so a second run builds nothing; the one of an earlier build
# of that serving image is removed (one is 5 GB).
set -o errexit -o nounset -o pipefail

REPOSITORY=mnist-serve/kind-node-preloaded
LABEL=mnist-serve.preloaded  # its value: the serving image's name
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
[[ "${1:-}" != -h && "${1:-}" != --help ]] || { usage; exit 0; }
(($# >= 2)) || { usage >&2; exit 2; }
node=$1 serving=$2 images=("${@:2}")
say() { echo "preload: $*" >&2; }

ids="$(docker image inspect --format '{{.Id}}' "$node" "${images[@]}")" || exit 1
# The images' names are in the hash too (the names the node's containerd holds them under), and this script.
tag="$REPOSITORY:$({ printf '%s\n' "$ids" "${images[@]}"; cat "$0"; } | sha256sum | cut -c1-12)"
if docker image inspect "$tag" >/dev/null 2>&1; then
  say "$tag is there (${images[*]} in $node)"
  echo "$tag"
  exit 0
fi
# Those of an earlier build of this serving image (or of another node image) go first: this one needs
# their space. One a running cluster still uses stays (docker refuses).
docker image ls --quiet --filter "label=$LABEL=$serving" | xargs --no-run-if-empty docker image rm --force >/dev/null 2>&1 || true
# At its end docker commit holds the content twice: in the container and in the new image. The images share
# most layers: the largest's size, and a GiB for the rest.
size="$(docker image inspect --format '{{.Size}}' "${images[@]}" | sort -n | tail -n 1)"
free="$(df --output=avail -B1 "$(docker info --format '{{.DockerRootDir}}')" | tail -n 1)"
((free > 2 * size + 2 * 1024 ** 3)) || { echo "error: preloading ${images[*]} needs $(((2 * size) / 1024 ** 3 + 2)) GiB free where Docker keeps its data; $((free / 1024 ** 3)) GiB are (docker system df)" >&2; exit 1; }

start=$SECONDS
container="mnist-serve-preload-$$"
trap 'docker rm --force "$container" >/dev/null 2>&1 || true' EXIT
# The node's own containerd, on its own config and root, without kubelet, systemd or privileges: importing
# content mounts nothing.
docker run --detach --name "$container" --tmpfs /run --tmpfs /tmp --entrypoint containerd "$node" >/dev/null
until docker exec "$container" ctr version >/dev/null 2>&1; do
  [[ "$(docker inspect --format '{{.State.Running}}' "$container")" == true ]] \
    || { docker logs "$container" 2>&1 | tail -n 20 >&2; say "containerd of $node did not start"; exit 1; }
  sleep 0.5
done
say "importing ${images[*]} into $node's containerd (docker save | ctr images import --no-unpack)"
docker save "${images[@]}" | docker exec --interactive "$container" ctr --namespace k8s.io images import --digests --no-unpack - >&2
docker stop "$container" >/dev/null
# The container ran containerd: the image gets the node's entrypoint and command back.
changes=(--change "ENTRYPOINT $(docker image inspect --format '{{json .Config.Entrypoint}}' "$node")")
cmd="$(docker image inspect --format '{{json .Config.Cmd}}' "$node")"
[[ "$cmd" == null ]] || changes+=(--change "CMD $cmd")
docker commit "${changes[@]}" \
  --change "LABEL $LABEL=$serving org.opencontainers.image.description=\"$node with ${images[*]} preloaded in its containerd (k8s/kind/preload.sh)\"" \
  "$container" "$tag" >/dev/null
say "built $tag in $((SECONDS - start)) s"
echo "$tag"
