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
# A local CIFAR-10 archive (python or JPEG tar.gz); empty: the demo fetches the official one
# when online and otherwise runs on generated data alone.
CIFAR10 ?=

.PHONY: install test lint demo bench clean timm-install test-timm

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

# timm (a labeler backend, docs/labelers.md) imports torchvision, and PyPI's torchvision only
# imports beside the torch it was built with: torchvision 0.29.1 with torch 2.14.1 (a CUDA build,
# ~5.5 GB, that runs on the CPU too). A second venv runs the Hub-labeler tests with real timm.
TIMM_VENV ?= .venv-timm
TIMM_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TIMM_STAMP := $(TIMM_VENV)/.installed

$(TIMM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install -q --upgrade pip
	$(TIMM_VENV)/bin/python -m pip install -q $(TIMM_TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(TIMM_VENV)/bin/python -m pip install -q -e ".[generate,train,serve,test,labelers]"
	touch $(TIMM_STAMP)

timm-install: $(TIMM_STAMP)

test-timm: timm-install
	$(TIMM_VENV)/bin/python -m pytest -q tests/test_hub_labeler.py

demo: install
	$(VENV)/bin/cifar5m demo --out $(DEMO_DIR) $(if $(CIFAR10),--cifar10 $(CIFAR10))

clean:
	rm -rf $(VENV) $(TIMM_VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
