# `make test` and `make demo` work on a fresh machine: they create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-all lint demo demo-quick growth-demo bench clean distclean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first, pinned, so no dependency pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check loire flows infra tests bench examples

test: lint
	$(PY) -m pytest -m "not slow and not gpu" --durations=30

test-all: lint
	$(PY) -m pytest

# The embedded default: local Prefect server, MLflow on SQLite, the five domains through the pipeline.
demo: install
	$(VENV)/bin/loire demo --out loire-demo

demo-quick: install
	$(VENV)/bin/loire demo --quick --out loire-demo-quick

# Growth alone: every operator on the three families, with the measured |Δlogits|.
growth-demo: install
	$(PY) examples/grow_schedule.py

bench: install
	$(PY) bench/throughput.py
	$(PY) bench/grow.py

# Demo output and caches; the venv stays (`make distclean` removes it too).
clean:
	rm -rf .pytest_cache .ruff_cache loire-demo loire-demo-quick

distclean: clean
	rm -rf $(VENV)
