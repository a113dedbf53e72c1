# Both targets create the environment they need (.venv) from pyproject.toml and constraints.txt.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench docs conformance

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m torchqueue.demo

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
