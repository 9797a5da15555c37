# `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# CPU build from local disk; override for a CUDA box, e.g. TORCH_SPEC='torch==2.6.0'.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output
SHARED ?= ../shared

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/cifar5m demo --out $(DEMO_DIR) --cifar10 $(SHARED)/data/cifar10-jpeg.tar.gz

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
