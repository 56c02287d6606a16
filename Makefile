# VARGPT experiment suite. `make help` lists the targets; every target sets up .venv first.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
# The install stamp is keyed on the content of the requirement files: editing them (or a
# checkout that changes them) reinstalls; otherwise `make setup` returns at once.
REQ_HASH := $(shell cat requirements.txt pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
STAMP := .venv/.setup-$(REQ_HASH)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup test test-all smoke mlflow-ui clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install the pinned requirements (quick when nothing changed)

$(STAMP): requirements.txt pyproject.toml
	@bash .ci/setup-venv.sh
	@rm -f .venv/.setup-* && touch $@

test: setup ## run the test suite (what CI runs; excludes tests marked slow/gpu)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup ## run every test, including slow ones
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

smoke: setup ## plumbing check: the debug stage for a few seconds, logged to MLflow
	$(PY) -m experiments.run experiments/debug.yaml $(ARGS)

mlflow-ui: setup ## serve the MLflow dashboard for runs/mlflow.db on http://127.0.0.1:5000
	mkdir -p runs/mlartifacts
	$(PY) -m mlflow server --host 127.0.0.1 --port $${PORT:-5000} --workers 1 \
	  --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --default-artifact-root $(CURDIR)/runs/mlartifacts

clean: ## remove run outputs (runs/) but keep .venv
	rm -rf runs/ .pytest_cache
