# `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# The CPU build (this project's machines serve it from local disk). Elsewhere, plain PyPI
# would pull a multi-GB CUDA build: pass TORCH_INDEX=https://download.pytorch.org/whl/cpu.
# On a CUDA box (as in the README; pick the index matching the driver):
#   make install TORCH_SPEC='torch==2.6.0' TORCH_INDEX=https://download.pytorch.org/whl/cu124
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output
SHARED ?= ../shared

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
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
