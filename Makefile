# `make run` and `make test` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check lint typecheck bench bench-quick bench-sts bench-liveness bench-mcp bench-dpop clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/idgate serve

check: $(STAMP)
	$(BIN)/ruff check idgate tests bench
	$(BIN)/ruff format --check idgate tests bench
	$(BIN)/mypy idgate tests bench

# The real OpenID provider the integration tests start (npm oidc-provider, pinned by its lock).
OIDC_PEER := tests/peers/oidc
$(OIDC_PEER)/node_modules/.package-lock.json: $(OIDC_PEER)/package.json $(OIDC_PEER)/package-lock.json
	cd $(OIDC_PEER) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

test: check $(OIDC_PEER)/node_modules/.package-lock.json
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

bench-sts: $(STAMP)
	$(BIN)/python bench/sts_bench.py

# tools/call through idgate vs straight to the MCP server, with the official mcp SDK client.
bench-mcp: $(STAMP)
	$(BIN)/python bench/mcp_bench.py

# Time from completing a task on one gateway process to its refusal on another (p50/p99).
bench-liveness: $(STAMP)
	$(BIN)/python bench/liveness_bench.py

# Gateway throughput with DPoP-bound tokens (a fresh proof per call) against bearer tokens, same run.
bench-dpop: $(STAMP)
	$(BIN)/python bench/dpop_bench.py
