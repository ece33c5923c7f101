# The two set-up commands are `make run` and `make test`; both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint format services clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

## run: start the embedded local stack in the foreground (Ctrl-C stops everything);
##      options go in UP_ARGS, e.g. make run UP_ARGS=--demo-traffic
UP_ARGS ?=
run: $(STAMP)
	$(BIN)/gateway-tap up $(UP_ARGS)

## services: make sure the machine services the suite needs are up and installed
services: $(STAMP)
	bash scripts/ensure-services.sh

## lint: ruff + mypy + import contracts (layers import downwards only, no cycles: pyproject's [tool.importlinter])
lint: $(STAMP)
	$(BIN)/ruff check gateway_tap collectors schemas dashboards tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

## test: lint, then the whole suite against real servers
test: $(STAMP) services lint
	$(BIN)/python -m pytest -q -ra

format: $(STAMP)
	$(BIN)/ruff check --fix gateway_tap collectors schemas dashboards tests bench
	$(BIN)/ruff format gateway_tap collectors schemas dashboards tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
