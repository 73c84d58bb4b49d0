# wsbatch: `make demo` to see it work, `make test` to check it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.dev-installed-stamp

.PHONY: install install-dev demo test lint typecheck unit bench bench-scale clean

# The program and its dataset export: what a user needs.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[export]'
	touch $(STAMP)

# Plus the test, lint and type-check tools (datasets, webdataset, moto and selenium
# for the tests that load what wsbatch writes).
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,export]'
	touch $(DEV_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

demo: install
	@bash scripts/demo.sh

lint: install-dev
	$(BIN)/ruff check batch tests scripts
	$(BIN)/ruff format --check batch tests scripts

typecheck: install-dev
	$(BIN)/mypy batch

# One worker per core: the tests wait on sockets and subprocesses more than on the CPU.
unit: install-dev
	$(BIN)/python -m pytest -n auto --dist loadfile

test: lint typecheck unit

# The comparison with the vendor's SDK (about 10 minutes), then bench-scale.
bench: install
	$(BIN)/python -m tests.bench.bench

# Issue 18's figures at scale: 1M-row validate/resume/status, 10,000 in flight, memory
# flat in rows (a few minutes; `python -m tests.bench.scale --help` to scale it down).
bench-scale: install
	$(BIN)/python -m tests.bench.scale

clean:
	rm -rf $(VENV) output/*/ .pytest_cache .mypy_cache .ruff_cache *.egg-info
