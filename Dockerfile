# syntax=docker/dockerfile:1
# mnist-serve: TorchServe 0.12 with the mnist handler, for CPU nodes (VARIANT=cpu) and NVIDIA GPU nodes
# (VARIANT=gpu). Build it with `make image` / `make image-gpu` / `make image-with-model` (docker/build.sh).
#
#   targets   serve        the server; it downloads its model from the registry at start (the default)
#             with-model   the same plus an archive built into the image (MODEL_SOURCE=image: kind, air-gapped)
#             train        the training job (k8s/train-job.yaml): the same stack plus plots and the archiver
#   args      VARIANT=cpu|gpu, TORCH_INDEX_URL (CPU-only torch, see docker/install.sh), MODEL_ARCHIVE
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

FROM ${CUDA_IMAGE} AS cuda

# --- the Python environment, built apart so no installer reaches the final stage -------------------
FROM ${PYTHON_IMAGE} AS builder
ARG VARIANT
ARG TORCH_INDEX_URL=""
COPY docker/install.sh docker/requirements.txt docker/requirements-cuda.txt docker/requirements-train.txt /src/docker/
RUN --mount=type=cache,target=/root/.cache/pip \
    TORCH_INDEX_URL="${TORCH_INDEX_URL}" /src/docker/install.sh python "${VARIANT}" /opt/venv --without-pip

FROM builder AS builder-train
ARG VARIANT
ARG TORCH_INDEX_URL=""
RUN --mount=type=cache,target=/root/.cache/pip \
    TORCH_INDEX_URL="${TORCH_INDEX_URL}" /src/docker/install.sh python "${VARIANT}" /opt/venv --with-training --without-pip

# --- what differs between the variants at run time -------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-cpu

FROM ${PYTHON_IMAGE} AS runtime-gpu
# A driver older than CUDA 13 needs (< 580) on a data-centre GPU (the T4 of g4dn, A10G of g5) runs
# CUDA 13 through these libraries; the NVIDIA container toolkit (1.17.5+) puts them in use only then.
COPY --from=cuda /usr/local/cuda-13.0/compat/ /usr/local/cuda/compat/
# Which driver parts the NVIDIA container toolkit mounts: CUDA, and nvidia-smi (TorchServe counts
# GPUs with it). No NVIDIA_VISIBLE_DEVICES here: the device plugin sets it to the GPUs a pod was
# given; "all" in the image would hand every GPU to pods that asked for none.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

# --- the server -------------------------------------------------------------------------------------
FROM runtime-${VARIANT} AS serve
COPY docker/install.sh /opt/mnist-serve/docker/install.sh
RUN /opt/mnist-serve/docker/install.sh system
COPY --from=builder /opt/venv /opt/venv
# Only what runs: the handler and server settings, the registry client, the entrypoint.
COPY handler/ /opt/mnist-serve/handler/
COPY training/ /opt/mnist-serve/training/
COPY docker/entrypoint.py /opt/mnist-serve/docker/entrypoint.py
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
    TORCHSERVE_CONFIG=/opt/mnist-serve/handler/config.properties
# The uid, not the name, so Kubernetes' runAsNonRoot can check it.
USER 1000:1000
WORKDIR /home/model-server
# Inference (predictions, /ping) and Prometheus metrics. Management (8081) listens on loopback only.
EXPOSE 8080 8082
ENTRYPOINT ["/opt/venv/bin/python", "/opt/mnist-serve/docker/entrypoint.py"]

# --- the training job: `python -m training ...` (k8s/train-job.yaml runs train, archive, publish) ------
FROM serve AS train
COPY --from=builder-train /opt/venv /opt/venv
# The commit the code came from, for metrics.json: the image has no .git (docker/build.sh passes it).
ARG GIT_COMMIT=unknown
# matplotlib's cache, under the writable /tmp like the rest.
ENV MPLCONFIGDIR=/tmp/matplotlib \
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
