# Two commands matter: `make demo` and `make test`. Both work on a fresh machine with Python, pip and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint typecheck unit demo clean

# Two stamps in one venv: `make demo` installs the runtime and the demo extra only (the first run is quick);
# `make test` (and install, lint, bench...) the test extra, which includes the demo one, so a later `make demo`
# has nothing to do and `make demo` then `make test` adds what the tests need.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(BIN)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

$(BIN)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/.installed-demo $@

install: $(BIN)/.installed-test

# ruff, mypy --strict, and the package layering (the import-linter contracts in pyproject.toml).
lint: install
	$(BIN)/ruff check raftlb tests
	$(BIN)/mypy
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

demo: $(BIN)/.installed-demo
	$(BIN)/raftlb demo

# raftlb against HAProxy and direct (nginx backend, wrk, one core per proxy): req/s, p50/p99, CPU/request,
# RSS, 10,000 held connections; bench/run.py. Not part of `make test`; installs nginx, haproxy, wrk if missing.
.PHONY: bench
bench: install
	$(BIN)/python bench/run.py --json bench/results/latest.json

# HTTP/2 beside it: h2load (h2c) against raftlb and HAProxy (`proto h2` both sides), nginx h2c backend, one core
# each; bench/h2bench.py. UPSTREAM=http1 while raftlb's clusters speak HTTP/1.1 to their nodes only.
.PHONY: bench-h2
bench-h2: install
	$(BIN)/python bench/h2bench.py --upstream $(or $(UPSTREAM),http2)

# Failover (SIGKILL the leader under writes) and read scaling (fenced reads vs leader-only), raftlb against
# HAProxy: docs/failover.md. Not part of `make test`; each takes a few minutes and installs haproxy if missing.
.PHONY: bench-failover bench-readscale
bench-failover: install
	$(BIN)/python bench/failover.py

bench-readscale: install
	$(BIN)/python bench/readscale.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
