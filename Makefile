# Each target creates .venv and installs what it needs (idempotent: a stamp file per install).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; without a GPU, install it first so no
# dependency pulls a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: demo test bench cluster-start cluster-stop clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
ifneq ($(HAS_GPU),yes)
	$(BIN)/pip install --quiet $(TORCH_CPU)
endif
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/sft recipe=tiny_sft

test: $(VENV)/.installed
	$(BIN)/python -m pytest --durations=15 tests

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks

cluster-start:
	slurm/start-cluster.sh

cluster-stop:
	slurm/stop-cluster.sh

clean:
	rm -rf $(VENV) runs
