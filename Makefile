# Each target creates the environment it needs from pyproject.toml and constraints.txt: the demo a small
# one of its own (.venv-demo: the library with the hdf5 and pyg extras it uses), the rest the full dev
# and bench set (.venv: tests, docs, the libraries the benchmarks compare against).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DEMO_VENV := .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.installed

.PHONY: demo test bench docs conformance

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev,bench]"
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q -c constraints.txt -e ".[hdf5,pyg]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(DEMO_VENV)/bin/python -m torchqueue.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# PyTorch's own DataLoader tests against QueueFlowLoader, when ../shared/conformance is there
# (tests/conformance-differences.txt lists the tests left out, and why).
conformance: $(STAMP)
	PY=$(VENV)/bin/python .ci/conformance

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks

# Warnings are errors: a broken reference or an undocumented public object fails the build.
docs: $(STAMP)
	$(VENV)/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
