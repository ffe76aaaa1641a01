# Two set-up commands: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARTIFACTS ?= artifacts
# docker compose v2 plugin when present, else the v1 python tool
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
export MODEL_ARTIFACTS_DIR := $(abspath $(ARTIFACTS))

.PHONY: venv train demo test test-fast bench build base-image up down logs load report clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

$(ARTIFACTS)/.trained: $(STAMP) $(wildcard modelserver/*.py)
	$(BIN)/python -m modelserver.train --out $(ARTIFACTS)
	@touch $@

train: $(ARTIFACTS)/.trained

demo: train
	$(BIN)/python -m balancer demo

test: train
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: train
	$(BIN)/python -m pytest -q -m "not containers and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(ARTIFACTS) var build *.egg-info
