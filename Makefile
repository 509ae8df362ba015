# Two commands for a fresh machine: `make train` (trains the VAE on built-in data) and `make test`.
# Each creates .venv when it is missing and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
# A CUDA build of torch by default, so the CUDA kernels compile wherever a toolkit is found,
# GPU or not. For a CPU-only torch: make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.fastvae-built

.PHONY: install train test bench gpu-check clean

install: $(BUILT)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch, setuptools and ninja must be there before the build: it runs without build isolation.
$(DEPS): | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH) "setuptools>=64" wheel ninja
	touch $@

$(BUILT): $(DEPS) setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	$(PY) -m pip install -e ".[test,plot]" --no-build-isolation
	touch $@

# --resume: a second `make train` continues the run, or says it is done, rather than being refused.
train: install
	$(PY) -m fastvae train --out runs/shapes --resume

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m pytest bench/ --benchmark

# On a GPU machine with torch, triton and pytest installed (no venv, no network): build for sm_90,
# test, sanitize, benchmark, all into one folder: make gpu-check OUT=dir. DRY_RUN=1 rehearses it
# without a GPU (CI does); ONLY="tests bench" reruns some steps. See bench/gpu_check.py.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py $(if $(OUT),--out $(OUT)) $(if $(DRY_RUN),--dry-run) $(if $(ONLY),--only $(ONLY))

clean:
	rm -rf build fastvae/_C*.so *.egg-info
