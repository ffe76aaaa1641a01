# Two set-up commands: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARTIFACTS ?= artifacts
# docker compose v2 plugin when present, else the v1 python tool
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
export MODEL_ARTIFACTS_DIR := $(abspath $(ARTIFACTS))

.PHONY: venv native train demo test test-fast bench build base-image up down logs load report clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

$(ARTIFACTS)/.trained: $(STAMP) $(wildcard modelserver/*.py model_a/*.py model_b/*.py)
	$(BIN)/python -m modelserver.train --out $(ARTIFACTS)
	@touch $@

train: $(ARTIFACTS)/.trained

# The request path compiled with mypyc (balancer/native.py); rebuilt only when its sources
# changed, and skipped with a warning where there is no C compiler.
native: $(STAMP)
	$(BIN)/python scripts/build_native.py --if-stale

demo: train native
	$(BIN)/python -m balancer demo

test: train native
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: train native
	$(BIN)/python -m pytest -q -m "not containers and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(ARTIFACTS) var build *.egg-info

# --- Containers: docker-compose.yml names the images; scripts/build_images.py
# builds them with `docker build --network host` (builds reach the Debian and
# PyPI mirrors through the host's network), reusing cached layers.
LOAD_ARGS ?=
REPORT_ARGS ?=
# The balancer's admin API (published on 127.0.0.1:8081) needs a bearer token.
ADMIN_TOKEN_FILE := var/admin-token
# `exec` needs -T when make runs without a terminal (CI, pipes).
EXEC_TTY := $(shell [ -t 0 ] || echo -T -e COLUMNS=120)

base-image:
	scripts/build-base-image.sh

build: base-image $(STAMP)
	$(BIN)/python scripts/build_images.py

$(ADMIN_TOKEN_FILE):
	@mkdir -p $(@D)
	@umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(24))' >$@

up: build $(ADMIN_TOKEN_FILE)
	BALANCER_ADMIN_TOKEN="$$(cat $(ADMIN_TOKEN_FILE))" $(COMPOSE) up -d --no-build
	@$(PYTHON) scripts/wait_ready.py --token-file $(ADMIN_TOKEN_FILE) --timeout 120
	@echo "balancer http://127.0.0.1:8080  admin http://127.0.0.1:8081 (token in $(ADMIN_TOKEN_FILE))  prometheus http://127.0.0.1:9090"

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs --tail=200 -f

load: $(STAMP)
	$(BIN)/python -m balancer load --url http://127.0.0.1:8080 $(LOAD_ARGS)

report:
	$(COMPOSE) exec $(EXEC_TTY) balancer python -m balancer report --store /data/outcomes.db $(REPORT_ARGS)

# --- Benchmarks (issue #9): one interleaved run of every configuration writes BENCHMARKS.md (~7 min).
# BENCH_ARGS=--quick for a 1-2 minute smoke run; --profile adds a py-spy profile of the balancer.
BENCH_ARGS ?=

bench: train native
	$(BIN)/python -m bench $(BENCH_ARGS)
