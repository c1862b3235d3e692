# One-stop entry points. `make test` on a fresh machine creates .venv, installs the pinned
# toolchain (CPU torch from the local wheel, never a resolver-chosen CUDA build), builds the
# C++ extension and runs the suite.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

.PHONY: venv build test test-fast bench lint clean gpu-check

$(STAMP): requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .

test: build lint
	$(VPY) -m pytest -q tests

bench: build
	$(VPY) -m benchmarks.run

lint: $(STAMP)
	$(VPY) -m ruff check maca_kernels tests benchmarks

clean:
	rm -rf build *.egg-info maca_kernels/_C*.so

# `make gpu-check` on a lent GPU machine (SPEC §7): the machine's own python3 (torch 2.11, triton 3.6, no
# network); none of the .venv machinery above runs. Builds the extension in place, runs the GPU test tier and
# the GPU benchmarks with bounded autotuning, writes benchmarks/results/<date>-<gpu>.{json,md}. Stops itself
# within GPU_CHECK_LIMIT_S (SIGINT: partial results are kept). `make gpu-check DRY=1`: a CPU check of the
# script with the .venv python, tiny shapes, output in a temporary folder.
GPU_PY ?= python3
GPU_CHECK_LIMIT_S ?= 480
ifeq ($(DRY),1)
gpu-check: build
	$(VPY) -m benchmarks.gpu_check --dry-run
else
gpu-check:
	MACA_KERNELS_TUNE=$${MACA_KERNELS_TUNE:-quick} timeout -s INT -k 30 $(GPU_CHECK_LIMIT_S) $(GPU_PY) -m benchmarks.gpu_check
endif
