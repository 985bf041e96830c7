# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test models venv lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on disk (a bare `torch` would pull a CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

models: $(STAMP)
	$(PY) -m specedge.models fetch

demo: models
	$(PY) -m specedge.demo $(ARGS)

test: models
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the whole benchmark table (about 35 minutes here); `make bench ARGS=--quick` in under 10 minutes
bench: models
	$(PY) -m bench $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
