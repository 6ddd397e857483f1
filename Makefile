# make run   start corrald with state and a dev PKI in ./var (created on first run)
# make test  run the test suite
# make lint  ruff and mypy --strict
# Each target first creates .venv and installs corral into it (editable).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test lint clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[dev]'
	touch $@

run: $(INSTALLED)
	$(BIN)/corrald --state-dir var --init-pki --listen 127.0.0.1:7443 --listen unix:var/corrald.sock

test: $(INSTALLED)
	$(BIN)/python -m pytest

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
