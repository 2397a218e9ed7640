# The quick-start commands: `make demo` and `make test`. Both set up .venv from nothing first, from requirements.lock.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# exactly 2.13.0: it installs the local CPU build; a range would pull a newer torch with CUDA packages
TORCH := torch==2.13.0

$(BIN)/flywheel: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	touch $@

.PHONY: setup demo test proto bench lock wheel
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

# The wheel (chip profiles, reference models, saved queries and criteria inside) into dist/.
wheel: setup
	rm -rf dist build
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .
	rm -rf build

# Refresh requirements.lock: resolve pyproject.toml's ranges anew in a clean virtualenv and freeze what it got.
lock:
	rm -rf .lock-venv
	$(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q $(TORCH)
	.lock-venv/bin/pip install -q ".[dev]"
	{ echo "# Exact versions of every dependency (dev tools included) that make setup, CI and the image install; torch is"; \
	  echo "# installed first, exactly 2.13.0 (the CPU build), and is not listed. Refresh with: make lock"; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|flywheel|pip|setuptools|wheel)( @|==)'; \
	} > requirements.lock
	rm -rf .lock-venv
