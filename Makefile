# The two set-up commands of README.md: `make demo` (main job) and `make test` (test suite).
#
# torch is installed only when it is missing (then the pinned CPU build); an installed torch, e.g.
# a cluster's CUDA build, is kept: it is passed to pip pinned at its own version, so nothing that
# pip resolves can replace it.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q --disable-pip-version-check
CPU_TORCH = "torch==2.13.0" triton
TORCH_VERSION := $(shell $(PYTHON) -c "import torch; print(torch.__version__)" 2>/dev/null)
TORCH_REQ = $(if $(TORCH_VERSION),"torch==$(TORCH_VERSION)",$(CPU_TORCH))

.PHONY: install demo test test-fast lint

install:
	$(PIP_INSTALL) $(TORCH_REQ) -e ".[dev]"
	@$(PYTHON) -c "import torch; print('torch', torch.__version__)"

demo: install
	bash launch/demo.sh

lint:
	$(PYTHON) -m ruff check amuse_dist tests benchmarks
	$(PYTHON) -m ruff format --check amuse_dist tests benchmarks

test: install lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q tests

# the unit tier only (pytest -m unit): in-process tests, under 2 minutes on 2 cores
test-fast: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q -m unit tests
