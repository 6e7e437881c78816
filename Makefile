# One-command entry points. Each target creates .venv and installs what it needs by itself.
#   make demo   - run the main job on the built-in example
#   make test   - run the test suite (what CI runs)
#   make bench  - run the benchmarks
# TORCH_SPEC picks the torch build: the default matches the CPU wheel cached on our build
# machines; elsewhere use e.g. `make test TORCH_SPEC=torch` or any torch>=2.2.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip's notes about unused local index folders are noise here
QUIET_PIP := grep -v -e "is ignored: it is neither a file nor a directory" || true

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q -e ".[dev,example,s3]" 2>&1 | $(QUIET_PIP)
	$(PY) -c "import prefect_influence, prefect_influence.tasks, prefect_influence.flows, torch; print('installed prefect-influence with torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prefect-influence demo

test: $(STAMP)
	@# headless Chromium for the deployment UI test (Debian package; skipped test if unavailable)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the UI check will be skipped"
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]" 2>&1 | $(QUIET_PIP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) influence-output
