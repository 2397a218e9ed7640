# The two quick-start commands: `make demo` and `make test`. Both set up .venv from nothing first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/flywheel: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# exactly 2.13.0: it installs the local CPU build; a range would pull a newer torch with CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

.PHONY: setup demo test proto bench
setup: $(BIN)/flywheel

demo: setup
	$(BIN)/flywheel demo

test: setup
	$(BIN)/python proto/generate.py --check
	$(BIN)/python -m pytest -q

proto: setup
	$(BIN)/python proto/generate.py

bench: setup
	$(BIN)/python -m bench.ingest
