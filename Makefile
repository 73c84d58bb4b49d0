# wsbatch: `make demo` to see it work, `make test` to check it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,export]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	@bash scripts/demo.sh

lint: install
	$(BIN)/ruff check batch tests
	$(BIN)/ruff format --check batch tests

typecheck: install
	$(BIN)/mypy batch

unit: install
	$(BIN)/python -m pytest

test: lint typecheck unit

bench: install
	$(BIN)/python -m tests.bench.bench

clean:
	rm -rf $(VENV) output/*/ .pytest_cache .mypy_cache .ruff_cache *.egg-info
