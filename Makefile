# Two entry points for a fresh Debian machine with Python 3.11:
#   make demo   set up and run the pipeline end to end on the embedded default
#   make test   set up and run lint, type checks and the whole test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration bench system-deps venv clean

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-venv
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian splits venv/ensurepip out of python3; install it when we can, say so when we cannot.
.PHONY: system-venv
system-venv:
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-dev; \
	  else echo "missing: the venv module. Install it with: sudo apt-get install python3-venv" >&2; exit 1; fi; \
	fi

# The test suite runs real servers: ClickHouse (Debian's clickhouse-server, native protocol)
# and Prometheus (Debian's prometheus, for the container producer's tests); the Redis
# Enterprise producer's tests make TLS certificates with the openssl command line tool.
SYSTEM_PACKAGES := clickhouse-server:/usr/sbin/clickhouse-server prometheus:/usr/bin/prometheus \
	openssl:/usr/bin/openssl
system-deps:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do pkg=$${entry%%:*}; path=$${entry#*:}; \
	  command -v $$pkg >/dev/null || [ -x $$path ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing:$$missing. Install with: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi

demo: $(STAMP)
	$(BIN)/metering demo

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The suite mostly waits (group joins, servers starting, processes killed and restarted), so
# two pytest processes halve its time even on two cores; each starts its own broker and
# ClickHouse server. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP) system-deps lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --durations=15 tests

bench: $(STAMP) system-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
