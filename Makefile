# Each target creates .venv and installs what it needs (idempotent: a stamp file per install).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Every install takes the exact versions in the lock (tools/lock.py); `make lock` upgrades it.
LOCK := requirements.lock
# The CPU build of the locked torch lies on this machine's disk; without a GPU, install it first so
# no dependency pulls a multi-GB CUDA build. A GPU machine takes the CUDA build of the same version.
TORCH_CPU := $(shell grep -m1 '^torch==' $(LOCK))
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: demo test test-fast bench lock cluster-start cluster-stop clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The project is built with the locked setuptools (no isolated build env that would take the newest).
$(VENV)/.installed: $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/pip install --quiet -c $(LOCK) pip setuptools
ifneq ($(HAS_GPU),yes)
	$(BIN)/pip install --quiet $(TORCH_CPU)
endif
	$(BIN)/pip install --quiet --no-build-isolation -c $(LOCK) -e '.[dev,bench,eval]'
	$(BIN)/python tools/lock.py check
	touch $@

demo: $(VENV)/.installed
	$(BIN)/sft recipe=tiny_sft

# Every tier (tests/unit, integration, cluster, gpu): what CI runs.
test: $(VENV)/.installed
	$(BIN)/python -m pytest --durations=15 tests

# The unit tier alone (marker `unit`): in-process, < 2 minutes on 2 cores; no cluster, no `sft` subprocess.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest --durations=10 -m unit tests/unit

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks

# Newest versions within pyproject.toml's ranges (torch held; TORCH=2.14.1 to move it), and what changed.
lock: $(BIN)/python
	$(BIN)/python tools/lock.py write $(if $(TORCH),--torch $(TORCH))

cluster-start:
	slurm/start-cluster.sh

cluster-stop:
	slurm/stop-cluster.sh

clean:
	rm -rf $(VENV) runs
