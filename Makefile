# make run   -> set up .venv if missing, then train jobs/quickstart.yaml on an embedded local Ray
# make test  -> set up .venv if missing, then run the whole test suite
# make lint  -> the formatter and the linter (ruff) and the type checker (mypy), as CI runs them
#
# TORCH selects the torch build. The default is 2.13.0 taken from pip's configured indexes; on a
# machine whose PyPI would serve a CUDA build, ask for the CPU one explicitly:
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
# GPU users name their CUDA build instead, e.g.
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cu128

PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
JOB ?= jobs/quickstart.yaml
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.elastune-installed

.PHONY: run test lint setup bench gpu-check clean k8s-dashboards k8s-crd

run: $(STAMP)
	$(BIN)/elastune run $(JOB)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# `ruff format platform tests operators` and `ruff check --fix ...` repair most of what this finds.
lint: $(STAMP)
	$(BIN)/ruff format --check platform tests operators
	$(BIN)/ruff check platform tests operators
	$(BIN)/mypy

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 2; }
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

bench: $(STAMP)
	$(BIN)/python tests/bench/bench_vs_torchrun.py

# Every GPU check and GPU benchmark in one go (about 8 minutes on one GPU; a summary table at the
# end). Where the venv is not built here (a GPU machine without a registry), run the script itself:
#   PYTHONPATH=platform python tests/bench/gpu_check.py
gpu-check: $(STAMP)
	$(BIN)/python tests/bench/gpu_check.py --json gpu-check.json

# k8s/ holds copies of what kustomize must find inside its own folders; tests hold them equal.
k8s-dashboards:
	cp dashboards/grafana/*.json k8s/base/dashboards/

k8s-crd: $(STAMP)
	$(BIN)/elastune schema --crd > k8s/operator/crd.yaml

clean:
	rm -rf $(VENV) runs .elastune
