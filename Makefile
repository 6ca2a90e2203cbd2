# Every target installs what it needs; `.venv/.installed` is rebuilt only when the dependency files change.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install test test-fast lint demo demo-model bench system-deps clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[worker,gateway,ui,test]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests drive: a real redis-server and a real (headless) Chromium; installed when missing.
system-deps:
	@missing=""; command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install:$$missing (e.g. sudo apt-get install$$missing)" >&2; exit 1; fi; \
	fi

test: install system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not browser and not slow"

lint: install
	$(BIN)/ruff check broker_worker broker_batch gateway tests bench ui scripts
	$(BIN)/ruff format --check broker_worker broker_batch gateway tests bench ui scripts
	$(BIN)/mypy

demo: install
	$(BIN)/python scripts/demo.py

# Trains the committed demo checkpoint (demo_model/) again from scratch with its fixed RNG seeds (CPU, ~35 min, then ~12 min for the shape phases).
demo-model: install
	$(BIN)/python -m broker_worker.model.demo_training demo_model $(DEMO_MODEL_ARGS)
	$(BIN)/python -m broker_worker.model.demo_shapes demo_model

bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
