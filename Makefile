# The two commands of the quick start: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint check bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Start the gateway on :8080 against the eight built-in simulated regions
## (in-process store unless REDIS_URL is set).
run: $(STAMP)
	$(BIN)/balancer serve --simulate

## Run the whole suite (lint first: it takes a second).
test: $(STAMP)
	$(BIN)/ruff check balancer tests bench
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check balancer tests bench
	$(BIN)/ruff format --check balancer tests

## Validate regions.yaml (endpoint/key variables may be unset: --simulate).
check: $(STAMP)
	$(BIN)/balancer check --simulate regions.yaml

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
