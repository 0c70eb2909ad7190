# mnist-serve: TorchServe 0.12 with the mnist handler, for CPU nodes (VARIANT=cpu) and NVIDIA GPU nodes
# (VARIANT=gpu). Build it with `make image` / `make image-gpu` / `make image-with-model` (docker/build.sh).
#
#   targets   serve        the server; it downloads its model from the registry at start (the default)
#             with-model   the same plus an archive built into the image (MODEL_SOURCE=image: kind, air-gapped)
#             train        the training run (charts/mnist-train): the same stack plus plots and the archiver
#   args      VARIANT=cpu|gpu, TORCH_INDEX_URL (CPU-only torch, see docker/install.sh), MODEL_ARCHIVE,
#             PYTHON_IMAGE, CUDA_IMAGE, CUDA_COMPAT=image|skip (docker/build.sh chooses them where the
#             defaults cannot be pulled)
#   secret    ca: a CA bundle for pip behind a TLS-intercepting proxy, used by the builder stages only
#
# No "# syntax=" line: it makes BuildKit pull a frontend image; the built-in frontend suffices.
#
# Every install and start step is a script (docker/install.sh, docker/entrypoint.py) that the tests
# also run on a machine without Docker (tests/test_image.py, tests/test_entrypoint.py).

ARG VARIANT=cpu
# Both variants run on the same Debian 12 + Python 3.11 + Java 17 stack the tests run on; the GPU
# variant takes CUDA from torch's own wheels (CUDA 13 runtime, cuBLAS, cuDNN: requirements-cuda.txt)
# and only the driver forward-compatibility libraries from NVIDIA's CUDA image. (NVIDIA's images are
# Ubuntu 24.04, whose archive has no Python 3.11, and their CUDA runtime would be a second copy.)
# Pinned by exact tag; to pin by digest as well, pass the image as NAME:TAG@sha256:DIGEST.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG CUDA_COMPAT=image

# --- the Python environment, built apart so no installer reaches the final stage -------------------
FROM ${PYTHON_IMAGE} AS builder
ARG VARIANT
ARG TORCH_INDEX_URL=""
# The venv's variant: docker/build.sh passes gpu for a cpu image without a CPU-only torch index, whose
# venv is the same set of files, so both images share this layer instead of building it twice.
ARG VENV_VARIANT=${VARIANT}
COPY docker/install.sh docker/requirements.txt docker/requirements-cuda.txt docker/requirements-train.txt /src/docker/
# The CA bundle is a secret mount: it exists only while this command runs, never in a layer.
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=ca \
    TORCH_INDEX_URL="${TORCH_INDEX_URL}" /src/docker/install.sh python "${VENV_VARIANT}" /opt/venv --without-pip

# The training image's additions, apart from the venv: its image then shares the serving venv's layer.
FROM builder AS builder-train
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=ca \
    /src/docker/install.sh training /opt/venv /opt/training

# --- the driver forward-compatibility libraries (GPU variant) ----------------------------------------
# A driver older than CUDA 13 needs (< 580) on a data-centre GPU (the T4 of g4dn, A10G of g5) runs
# CUDA 13 through these libraries; the NVIDIA container toolkit (1.17.5+) puts them in use only then.
# CUDA_COMPAT=skip (the cpu variant, and where NVIDIA's image cannot be pulled: BuildKit then never
# pulls it) gives an empty directory instead; such a GPU image needs a driver >= 580 on the node.
FROM ${CUDA_IMAGE} AS compat-image
FROM ${PYTHON_IMAGE} AS compat-skip
RUN mkdir -p /usr/local/cuda-13.0/compat
FROM compat-${CUDA_COMPAT} AS compat

# --- what every target runs on: Java, the user, the venv, the code --------------------------------------
# The large layers come first and are the same for every variant and target, so they are stored once.
FROM ${PYTHON_IMAGE} AS runtime
COPY docker/install.sh /opt/mnist-serve/docker/install.sh
RUN /opt/mnist-serve/docker/install.sh system
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/mnist-serve \
    # The root filesystem is read-only in the pod: no .pyc files, and caches under the /tmp emptyDir.
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    # The entrypoint's writable paths; the chart mounts an emptyDir on each.
    MODEL_STORE=/home/model-server/model-store \
    LOG_DIR=/home/model-server/logs \
    TMPDIR=/tmp \
    MODEL_SOURCE=registry \
    MODEL_VERSION=production \
    # In front of TorchServe (handler/front.py), installed by docker/install.sh system.
    NGINX=/usr/sbin/nginx \
    TORCHSERVE_CONFIG=/opt/mnist-serve/handler/config.properties \
    # Which driver parts the NVIDIA container toolkit mounts on a GPU node: CUDA, and nvidia-smi
    # (TorchServe counts GPUs with it); ignored elsewhere. No NVIDIA_VISIBLE_DEVICES: the device plugin
    # sets it to the GPUs a pod was given; "all" here would hand every GPU to pods that asked for none.
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# The uid, not the name, so Kubernetes' runAsNonRoot can check it.
USER 1000:1000
WORKDIR /home/model-server

FROM runtime AS runtime-venv
COPY --from=builder /opt/venv /opt/venv
COPY --from=compat /usr/local/cuda-13.0/compat/ /usr/local/cuda/compat/
# Only what runs: the handler and server settings, the registry client, the entrypoint (no training code).
# After the venv: a change of the code is then a small layer, and the 5 GB venv layer above is stored, and
# carried by every kind load, once.
COPY handler/ /opt/mnist-serve/handler/
COPY registry/ /opt/mnist-serve/registry/
COPY docker/entrypoint.py /opt/mnist-serve/docker/entrypoint.py
COPY docker/startup/ /opt/mnist-serve/docker/startup/

# --- the server -------------------------------------------------------------------------------------
FROM runtime-venv AS serve
# Inference (predictions, /ping) and Prometheus metrics. Management (8081) listens on loopback only.
EXPOSE 8080 8082
ENTRYPOINT ["/opt/venv/bin/python", "/opt/mnist-serve/docker/entrypoint.py"]

# --- the training run: `python -m training ...` (charts/mnist-train: torchrun, archive, publish) ------
FROM runtime-venv AS train
COPY --from=builder-train /opt/training /opt/training
COPY training/ /opt/mnist-serve/training/
# The commit the code came from, for metrics.json: the image has no .git (docker/build.sh passes it).
ARG GIT_COMMIT=unknown
# matplotlib's cache, under the writable /tmp like the rest.
ENV PYTHONPATH=/opt/mnist-serve:/opt/training \
    MPLCONFIGDIR=/tmp/matplotlib \
    MNIST_SERVE_GIT_COMMIT=${GIT_COMMIT}
ENTRYPOINT ["/opt/venv/bin/python", "-m", "training"]
CMD ["--help"]

# --- the server with a model inside, for kind and air-gapped clusters --------------------------------
FROM serve AS with-model
ARG MODEL_ARCHIVE=artifacts/model-store/mnist.mar
COPY ${MODEL_ARCHIVE} /opt/mnist-serve/model/mnist.mar
ENV MODEL_SOURCE=image

# `docker build` without --target: the server without a model.
FROM serve
