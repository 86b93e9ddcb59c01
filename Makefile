# All setup lives here: `make demo` and `make test` work on a fresh machine with only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.osstune-installed
# The CPU build is enough for tests and the demo; a CUDA machine may override, e.g. TORCH_SPEC="torch>=2.9".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo bench-data clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/osstune demo

bench-data: install
	$(PY) bench/preprocess.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
