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

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

# --- set-up -------------------------------------------------------------------------------------
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed ## create the project venv (.venv/) with the pinned packages

# --- training -----------------------------------------------------------------------------------
train: venv ## train the CNN, export verified TorchScript, write metrics and plots to artifacts/
	$(PY) -m training train --out $(ARTIFACTS) $(TRAIN_FLAGS)

# --- Cassandra / Astra ---------------------------------------------------------------------------
cassandra-up: ## start the local Cassandra 5.0 node (fetched once; nothing starts if one answers already)
	scripts/cassandra.sh up

cassandra-down: ## stop the local node this project started
	scripts/cassandra.sh down

cassandra-status: ## is the local node up?
	scripts/cassandra.sh status

load-data: venv cassandra-up ## load the 70,000 MNIST images (and 1,000 to score) into Cassandra
	$(PY) -m training load-data --predict 1000

train-db: venv cassandra-up ## train from the database, with checkpoints in it
	$(PY) -m training train --source cassandra --checkpoints cassandra --out $(ARTIFACTS) $(TRAIN_FLAGS)

predict-table: venv cassandra-up ## score raw_predict rows with the production model into the predictions table
	$(PY) -m training predict-table --model production

bench-db: venv cassandra-up ## load and read figures, our layout against the notebook's, beside the targets
	$(PY) -m training bench-db

# --- checks -------------------------------------------------------------------------------------
test: venv ## run every test (unit, Cassandra, TorchServe, chart, cluster)
	$(PY) -m pytest

clean: ## remove artifacts/ (caches outside the checkout stay)
	rm -rf $(ARTIFACTS)

.PHONY: help venv train test clean cassandra-up cassandra-down cassandra-status load-data train-db predict-table bench-db
