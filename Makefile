# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test models venv lint bench gpu-check gpu-wheels docs clean

# Succeeds when $(PYTHON) already has a CUDA build of torch in the range pyproject.toml declares.
CUDA_TORCH := $(PYTHON) -c "import sys, torch; \
  v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); \
  sys.exit(not (torch.version.cuda and (2, 11) <= v < (2, 14)))"

$(STAMP): pyproject.toml
	# A CUDA torch already installed is kept (the venv sees it and pip leaves it); elsewhere torch
	# goes first, pinned: the CPU wheel on disk (a bare `torch` would pull a CUDA build)
	if $(CUDA_TORCH) 2>/dev/null; then \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	fi
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

# Every check that needs a GPU, in one run that fits its budget (bench/gpu_check.py; 480 s on
# one H100, docs/gpu-check.md): `make gpu-check OUT=DIR`, or `make gpu-check ARGS='--device cpu'`
# where there is none. Results: DIR/results.jsonl (a line per result, as measured) and
# DIR/summary.md; OUT defaults to bench/results/gpu-check-<cuda|cpu>. No venv: the machine's own
# python and torch (GPU_PY), plus the packages it lacks from .whl/ (`make gpu-wheels`),
# installed into .whl/site. Here (no CUDA) it runs with the venv's python, if there is one.
WHEELS ?= .whl
GPU_SITE := $(abspath $(WHEELS))/site
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
OUT ?=

gpu-check:
	# the wheels are for CPython 3.12 (the GPU machine's); another python uses what it has and
	# never sees .whl/site (its compiled modules would not load)
	site=""; \
	if ls $(WHEELS)/*.whl >/dev/null 2>&1 && \
	   $(GPU_PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then \
	  $(GPU_PY) -m pip install -q --no-deps --no-index --upgrade --target $(GPU_SITE) \
	    $(WHEELS)/*.whl && site="$(GPU_SITE)"; \
	fi; \
	PATH="$${site:+$$site/bin:}$$PATH" \
	PYTHONPATH="$(CURDIR)$${site:+:$$site}$${PYTHONPATH:+:$$PYTHONPATH}" \
	  $(GPU_PY) -m bench.gpu_check $(if $(OUT),--out $(OUT)) $(ARGS)

# The packages of deploy/gpu-wheels.txt as CPython 3.12 manylinux wheels in .whl/, to carry to a
# GPU machine that cannot reach the index. A package published only as an sdist (pure Python)
# is built into a py3-none-any wheel here; any other wheel built here would be refused.
gpu-wheels:
	mkdir -p $(WHEELS)
	set -e; for req in $$(grep -v '^#' deploy/gpu-wheels.txt); do \
	  $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d $(WHEELS) "$$req" 2>/dev/null \
	  || $(PYTHON) -m pip wheel -q --no-deps -w $(WHEELS) "$$req"; \
	done
	if ls $(WHEELS)/*.whl | grep -E -- '-cp3[0-9]+-cp3[0-9]+-' | grep -v -- '-cp312-cp312-'; then \
	  echo "the wheels above are not for CPython 3.12"; exit 1; fi
	ls $(WHEELS)/*.whl

# docs/cli.md from the commands' argument parsers and docs/system.svg from its source
# (specedge/clidoc.py, docs/system.py); tests/test_docs.py fails when either is stale
docs: $(STAMP)
	$(PY) -m specedge.clidoc
	$(PY) docs/system.py

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(WHEELS)
