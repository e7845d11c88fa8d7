# The two set-up commands of README.md: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: install demo test lint

install:
	$(PIP_INSTALL) "torch==2.13.0" triton -e ".[dev]"

demo: install
	bash launch/demo.sh

lint:
	$(PYTHON) -m ruff check amuse_dist tests benchmarks
	$(PYTHON) -m ruff format --check amuse_dist tests benchmarks

test: install lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q tests
