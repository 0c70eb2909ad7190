# mnist-serve: train an MNIST CNN, serve it with TorchServe, ship it to Kubernetes.
# Each target works on a fresh machine: it sets up what it needs first. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -o errexit -o nounset -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
ARTIFACTS ?= artifacts
TRAIN_FLAGS ?=
SOAK_FLAGS ?=
TESTS ?=

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

# --- set-up -------------------------------------------------------------------------------------
$(VENV)/.installed: pyproject.toml requirements.lock scripts/venv.sh
	PYTHON=$(PYTHON) scripts/venv.sh $(VENV)
	touch $@

venv: $(VENV)/.installed ## create the project venv (.venv/) from requirements.lock

lock: ## re-resolve pyproject.toml's dependencies today into requirements.lock (and the image's pins)
	scripts/lock.sh

# --- demo ---------------------------------------------------------------------------------------
DEMO_FLAGS ?=

demo: venv ## Cassandra, load, train from it, archive, publish, serve from the registry, predict, stop (DEMO_FLAGS="--epochs 3")
	$(PY) scripts/demo.py --out $(ARTIFACTS)/demo $(DEMO_FLAGS)

.PHONY: demo

# --- training -----------------------------------------------------------------------------------
train: venv ## train the CNN, export verified TorchScript, write metrics and plots to artifacts/
	$(PY) -m training train --out $(ARTIFACTS) $(TRAIN_FLAGS)

bench-train: venv ## training speed: 1 rank x 2 threads beside 2 ranks x 1 thread (torchrun, gloo), with the all-reduce's share
	$(PY) -m bench.train

# --- Cassandra / Astra ---------------------------------------------------------------------------
cassandra-up: ## start the local Cassandra 5.0 node (fetched once; nothing starts if one answers already)
	scripts/cassandra.sh up

cassandra-down: ## stop the local node this project started
	scripts/cassandra.sh down

cassandra-status: ## is the local node up?
	scripts/cassandra.sh status

astra-local-up: venv ## a local stand-in for Astra's connection path (bundle, metadata service, SNI proxy, TLS node, roles)
	$(PY) scripts/astra_local.py up

astra-local-down: venv ## stop it
	$(PY) scripts/astra_local.py down

load-data: venv cassandra-up ## load the 70,000 MNIST images (and 1,000 to score) into Cassandra
	$(PY) -m training load-data --predict 1000

train-db: venv cassandra-up ## train from the database, with checkpoints in it
	$(PY) -m training train --source cassandra --checkpoints cassandra --out $(ARTIFACTS) $(TRAIN_FLAGS)

predict-table: venv cassandra-up ## score raw_predict rows with the production model into the predictions table
	$(PY) -m training predict-table --version production

bench-db: venv cassandra-up ## load and read figures, our layout against the notebook's, beside the targets
	$(PY) -m training bench-db

# --- serving ------------------------------------------------------------------------------------
# The draw-a-digit page's port on 127.0.0.1: `make serve` lets a browser call it from this origin only.
UI_PORT ?= 8088
API ?= http://127.0.0.1:8080/predictions/mnist
MODEL_STORE := $(ARTIFACTS)/model-store
MAR := $(MODEL_STORE)/mnist.mar
ARCHIVED := handler/mnist_handler.py handler/inputs.py handler/index_to_name.json handler/model-config.yaml handler/archive.py

# No prerequisites: trains only when there is no model (`make train` retrains on purpose), and says so first.
$(ARTIFACTS)/model.pt:
	@echo "make: no $@ yet, so training one first (make train; a few minutes on 2 cores)." \
	  "To serve an archive you have instead: make serve ARCHIVE=artifacts/demo/model-store/mnist.mar" >&2
	$(MAKE) --no-print-directory train

$(MAR): $(ARTIFACTS)/model.pt $(ARCHIVED) | $(VENV)/.installed
	$(PY) -m handler.archive --model $(ARTIFACTS)/model.pt --out $(MODEL_STORE)

archive: $(MAR) ## build artifacts/model-store/mnist.mar (trains first only if artifacts/model.pt is missing)

# ARCHIVE: serve that .mar (the demo's, a downloaded version) as it is, with nothing built or trained.
ARCHIVE ?=

serve: venv $(if $(ARCHIVE),,$(MAR)) ## serve artifacts/model-store/mnist.mar (or ARCHIVE=FILE.mar) with TorchServe in the foreground on 127.0.0.1:8080
	$(PY) -m handler.server --archive $(or $(ARCHIVE),$(MAR)) --logs $(ARTIFACTS)/logs --allow-origin http://127.0.0.1:$(UI_PORT)

ui: ## the draw-a-digit page for the server (make serve, or a cluster's port-forward: API=URL), at http://127.0.0.1:8088
	$(PYTHON) scripts/ui_server.py --port $(UI_PORT) --api $(API)

predict: venv ## print the digit the running server reads in IMAGE: make predict IMAGE=samples/digit-7.png
	@test -n "$(IMAGE)" || { echo "usage: make predict IMAGE=path/to/digit.png (e.g. samples/digit-7.png)" >&2; exit 2; }
	$(PY) -m handler.client $(IMAGE)

bench-serve: $(MAR) ## load-test the server (wrk, 1/16/64 connections) against in-process TorchScript
	scripts/with-wrk.sh $(PY) -m bench.serve --archive $(MAR)

bench-flood: $(MAR) ## 300 and 1,000 concurrent 1 MB uploads and 200 slow ones beside real digits: nginx in front against TorchServe alone
	$(PY) -m bench.flood --archive $(MAR) --baseline

soak: $(MAR) ## 5 min at 64 connections with 10 % malformed requests and a worker kill, then the registry through a database restart
	scripts/with-wrk.sh $(PY) -m bench.soak --archive $(MAR) --metrics $(ARTIFACTS)/metrics.json $(SOAK_FLAGS)

publish: $(MAR) cassandra-up ## archive and record it in the model registry (mnist-registry publish)
	$(VENV)/bin/mnist-registry publish $(MAR) --metrics $(ARTIFACTS)/metrics.json

.PHONY: archive serve ui predict bench-serve bench-flood soak publish

# --- image and chart ---------------------------------------------------------------------------
image: ## build the CPU serving image (docker/build.sh cpu; starts a Docker engine where none runs; TORCH_INDEX_URL for a CPU-only torch)
	docker/build.sh cpu

image-gpu: ## build the GPU serving image (CUDA torch; without NVIDIA's base image the build says what the node then needs)
	docker/build.sh gpu

image-with-model: $(MAR) ## the CPU image with artifacts/model-store/mnist.mar inside (MODEL_SOURCE=image, for kind)
	MODEL_ARCHIVE=$(MAR) docker/build.sh cpu --with-model

image-train: ## build the GPU training image that charts/mnist-train runs (docker/build.sh cpu --train: the CPU one, for kind)
	docker/build.sh gpu --train

bench-image: image-with-model ## image sizes, seconds to probe-ready and first answer, SIGTERM to exit, beside the targets
	scripts/install-k8s-tools.sh helm >/dev/null
	$(PY) scripts/container.py

chart-lint: venv ## both charts: helm lint --strict, render every values file, validate against Kubernetes 1.36, test the output
	scripts/chart-lint.sh

cluster-up: ## a local Kubernetes 1.36 control plane (kwok) with 2 CPU and 2 GPU nodes; built once (~14 min), then ~5 s
	scripts/cluster.sh up

cluster-down: ## delete that cluster
	scripts/cluster.sh down

cluster-status: ## is it up?
	scripts/cluster.sh status

# The training run on the current kube context: RANKS pods, VALUES (a values file of charts/mnist-train),
# NAMESPACE, TRAIN_FLAGS for every rank, HELM_FLAGS passed to helm (--set image.repository=...).
RANKS ?=
VALUES ?=
NAMESPACE ?=
HELM_FLAGS ?=

train-cluster: ## train on the current kube context's cluster (charts/mnist-train: RANKS=2 VALUES=FILE); logs, then the version published
	scripts/train-cluster.sh $(if $(RANKS),--ranks $(RANKS)) $(if $(VALUES),--values $(VALUES)) \
	  $(if $(NAMESPACE),--namespace $(NAMESPACE)) $(if $(TRAIN_FLAGS),--train-flags "$(TRAIN_FLAGS)") -- $(HELM_FLAGS)

kind-smoke: venv $(MAR) ## kind cluster (node image from package registries): install, digits, NetworkPolicy, registry, upgrades under load
	k8s/kind-smoke.sh

.PHONY: image image-gpu image-with-model image-train bench-image chart-lint cluster-up cluster-down cluster-status train-cluster kind-smoke

# --- checks -------------------------------------------------------------------------------------
lint: venv ## ruff (lint, format) on the Python and shellcheck on the shell scripts; `scripts/lint.sh --fix` applies ruff's
	scripts/lint.sh

test: venv lint ## lint, then every test (unit, Cassandra, TorchServe, chart, cluster)
	$(PY) -m pytest

test-busy: venv ## the process-heavy tests beside a CPU hog on every core (TESTS="tests/test_demo.py" to choose)
	scripts/test-busy.sh $(TESTS)

clean: ## remove artifacts/ (caches outside the checkout stay)
	rm -rf $(ARTIFACTS)

.PHONY: help venv lock train bench-train lint test test-busy clean cassandra-up cassandra-down cassandra-status astra-local-up astra-local-down load-data train-db predict-table bench-db
