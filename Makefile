# Everyday commands; `make help` lists them.
PY ?= .venv/bin/python
VENV_BIN := .venv/bin
BENCH_ARGS ?=
# celery-batches (the `bench` extra) requires celery < 5.7: a venv of its own, so that .venv
# keeps the Celery the project runs on.
BENCH_VENV ?= .venv-bench

.PHONY: help venv dev test test-fast lint bench bench-quick bench-batches bench-purge bench-purge-compare profile up faults

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

venv: ## create .venv and install the project with its test tools
	python3 -m venv .venv && $(VENV_BIN)/pip install -q -e '.[test]'

dev: ## run the whole pipeline locally (embedded broker, SQLite)
	$(VENV_BIN)/dodo-webhooks dev

test: ## the full suite; first installs what it needs and lacks (scripts/test)
	scripts/test

test-fast: ## the suite without the slow end-to-end and fault-injection tests
	scripts/test -m "not slow"

lint: ## ruff, formatting, mypy --strict
	$(VENV_BIN)/ruff check . && $(VENV_BIN)/ruff format --check . && $(VENV_BIN)/mypy shared ingest workers

bench: ## benchmark ingest and pipeline against same-run floors (~30 min; BENCH_ARGS=--quick)
	PYTHONPATH=. $(PY) -m bench.run $(BENCH_ARGS)

bench-quick: ## a one-minute smoke run of the benchmark (1 rep, small N)
	PYTHONPATH=. $(PY) -m bench.run --quick $(BENCH_ARGS)

bench-batches: ## the product's drain against celery-batches, same backlog (installs the bench extra)
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q -e '.[test,bench]'
	PYTHONPATH=. $(BENCH_VENV)/bin/python -m bench.batches $(BENCH_ARGS)

bench-purge: ## the retention purge over 1,000,000 rows by day (30 days' partitions), and the ingest's latency meanwhile (~40 min on 2 vCPUs; --bodies rows: in place, ~75 min)
	PYTHONPATH=. $(PY) -m bench.purge $(BENCH_ARGS)

bench-purge-compare: ## what in a purge batch the ingest feels: purge settings, CPU, WAL (~22 min)
	PYTHONPATH=. $(PY) -m bench.purge_compare $(BENCH_ARGS)

profile: ## py-spy profile of an ingest worker and a celery pool child under load
	PYTHONPATH=. $(PY) -m bench.profile $(BENCH_ARGS)

faults: ## the full-size fault-injection suite (2,000 events per scenario)
	FAULT_EVENTS=2000 $(VENV_BIN)/pytest tests/faults -s

up: ## docker compose up (needs a Docker engine)
	docker compose up --build
