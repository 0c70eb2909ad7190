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

# --- checks -------------------------------------------------------------------------------------
test: venv ## run every test (unit, Cassandra, TorchServe, chart, cluster)
	$(PY) -m pytest

clean: ## remove artifacts/ (caches outside the checkout stay)
	rm -rf $(ARTIFACTS)

.PHONY: help venv train test clean
