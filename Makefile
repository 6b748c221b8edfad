# The two commands of the quick start: `make run` and `make test`; `make bench` for
# the benchmarks (BENCHMARKS.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test lint check bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The bench extra (matplotlib) only here, so `make test` stays light.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

## The benchmarks with default settings (about 18 minutes; balance twice: chat, then
## Responses API traffic, naive and redis only; then the PTU spill scenario, then learned
## capacity per rate-limit header style, then client budgets and fair share, then ~1,000
## open streams on one replica): Markdown tables on stdout,
## bench/results/{balance,balance-responses,overhead,scenarios,ptu,learning,fairness,streams}-*.json
## and bench/results/latest.png (chat's balance run). They need
## redis-server and, for the overhead one, wrk: installed with apt-get when missing and
## possible (root), else the overhead benchmark falls back to Python load processes.
bench: $(BENCH_STAMP)
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v wrk >/dev/null 2>&1 || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing:$$missing (apt-get install$$missing)"; fi; \
	fi
	$(BIN)/balancer bench balance $(BALANCE_ARGS)
	$(BIN)/balancer bench balance --operation responses --strategies naive,redis $(BALANCE_RESPONSES_ARGS)
	$(BIN)/balancer bench overhead $(OVERHEAD_ARGS)
	$(BIN)/balancer bench scenarios $(SCENARIOS_ARGS)
	$(BIN)/balancer bench ptu $(PTU_ARGS)
	$(BIN)/balancer bench learning $(LEARNING_ARGS)
	$(BIN)/balancer bench fairness $(FAIRNESS_ARGS)
	$(BIN)/balancer bench streams $(STREAMS_ARGS)

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

## Validate regions.yaml (endpoint/key variables may be unset: --simulate).
check: $(STAMP)
	$(BIN)/balancer check --simulate regions.yaml

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
