# Snapyard: `make run` and `make test` do all set-up themselves, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test setup venv engine cluster-deps image lint format demo cluster-demo test-unit test-docker test-thorough bench clean

run: setup
	$(BIN)/snapyard run

# Then the benchmark harness once, small (--quick: no figure is judged), so it
# keeps working; it holds the shared Docker lock for its ~minute.
test: setup lint
	$(BIN)/pytest $(PYTEST_ARGS)
	flock /tmp/snapyard-docker.lock $(BIN)/python -m bench --quick --out bench/results/quick

setup: venv engine cluster-deps image

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

engine:
	bash config/engine.sh

# PostgreSQL and the registry, for the cluster's tests and demo.
cluster-deps:
	bash config/cluster-deps.sh

image: venv engine
	$(BIN)/snapyard image build

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: setup
	$(BIN)/snapyard demo

cluster-demo: setup
	$(BIN)/snapyard cluster-demo

test-unit: venv
	$(BIN)/pytest tests/unit tests/contract -m 'not docker' $(PYTEST_ARGS)

test-docker: setup
	$(BIN)/pytest -m docker $(PYTEST_ARGS)

test-thorough: setup
	HYPOTHESIS_PROFILE=thorough $(BIN)/pytest tests/property $(PYTEST_ARGS)

# Every scenario; the shared Docker lock is held per real-engine scenario.
bench: setup
	$(BIN)/python -m bench --lock /tmp/snapyard-docker.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
