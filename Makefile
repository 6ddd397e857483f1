# make run   start corrald with state and a dev PKI in $(STATE) (created on first run)
#            on $(LISTEN) and unix:$(STATE)/corrald.sock, e.g.
#            make run LISTEN=127.0.0.1:7444 STATE=var2   (a second one beside the first)
# make test  run the test suite (two workers: pytest-xdist)
# make lint  ruff and mypy --strict
# Each target first creates .venv and installs corral into it (editable).

PYTHON ?= python3
VENV ?= .venv
LISTEN ?= 127.0.0.1:7443
STATE ?= var
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test lint clean

$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || echo "setting up $(VENV) with corral and its dev tools (first run only)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[dev]'
	touch $@

run: $(INSTALLED)
	$(BIN)/corrald --state-dir $(STATE) --init-pki --listen $(LISTEN) --listen unix:$(STATE)/corrald.sock

# Bytecode first: the suite starts hundreds of corrald and corral processes,
# and where PYTHONDONTWRITEBYTECODE is set each would compile corral again.
test: $(INSTALLED)
	$(BIN)/python -m compileall -q corral
	$(BIN)/python -m pytest -n 2

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict

clean:
	rm -rf $(VENV) $(STATE) .pytest_cache .mypy_cache .ruff_cache .hypothesis
