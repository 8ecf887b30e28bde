# Targets for people; `make help` lists them. (The lead merges the other targets here.)
PYTHON ?= .venv/bin/python
BENCH_ARGS ?=

.PHONY: help bench bench-quick profile

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

bench:  ## benchmark ingest and pipeline against same-run floors (~25 min; BENCH_ARGS=--quick)
	PYTHONPATH=. $(PYTHON) -m bench.run $(BENCH_ARGS)

bench-quick:  ## a one-minute smoke run of the benchmark (1 rep, small N)
	PYTHONPATH=. $(PYTHON) -m bench.run --quick $(BENCH_ARGS)

profile:  ## py-spy profile of an ingest worker and a celery pool child under load
	PYTHONPATH=. $(PYTHON) -m bench.profile $(BENCH_ARGS)
