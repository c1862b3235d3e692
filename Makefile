# One-stop entry points. `make test` on a fresh machine creates .venv, installs the pinned
# toolchain (CPU torch from the local wheel, never a resolver-chosen CUDA build), builds the
# C++ extension and runs the suite.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

.PHONY: venv build demo study test test-fast bench bench-integrations lint clean gpu-check interop

$(STAMP): requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .

# The main job: SmolLM2-135M (embedded default, installed on first use) at 4 bits with fixed-length and MaCa
# calibration, beside FP and RTN; table + results.json + perplexity.png in demo_out/.
demo: build
	$(VPY) -m maca_kernels demo --out demo_out

# The MaCa study (README "Results"): resumable, one JSON per finished run in study/runs/, then the table and
# plots; hours on 2 CPU cores (rerun to continue an interrupted study).
study: build
	$(VPY) -m maca_kernels study --out study

test: build lint
	$(VPY) -m pytest -q tests

# Checkpoints written here, read by an independent GPTQ reader (transformers + optimum + gptqmodel 7.7.0) in
# its own venv: gptqmodel asks for a newer torch than the pin, so its requirements go in without the torch
# line and the package with --no-deps, torch pinned by a constraints file. ~2 min to set up, ~5 on first run.
INTEROP_VENV := .venv-interop
$(INTEROP_VENV)/.ready:
	rm -rf $(INTEROP_VENV) build/interop && mkdir -p build/interop
	$(VPY) -m pip download -q gptqmodel==7.7.0 --no-deps --no-binary :all: -d build/interop
	tar xzf build/interop/gptqmodel-7.7.0.tar.gz -C build/interop
	grep -v '^torch' build/interop/gptqmodel-7.7.0/requirements.txt > build/interop/req-notorch.txt
	echo 'torch==2.13.0+cpu' > build/interop/constraints.txt
	$(VPY) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install -q -c build/interop/constraints.txt torch==2.13.0
	$(INTEROP_VENV)/bin/pip install -q -c build/interop/constraints.txt -r build/interop/req-notorch.txt \
		"optimum==2.3.*" "transformers>=5,<6" pytest
	$(INTEROP_VENV)/bin/pip install -q -c build/interop/constraints.txt --no-deps --no-build-isolation \
		build/interop/gptqmodel-7.7.0.tar.gz
	touch $@

# llm-compressor pins transformers <= 5.17 and compressed-tensors 0.19.0: a venv of its own, torch pinned.
LLMC_VENV := .venv-llmc
$(LLMC_VENV)/.ready:
	rm -rf $(LLMC_VENV) build/llmc && mkdir -p build/llmc
	echo 'torch==2.13.0+cpu' > build/llmc/constraints.txt
	$(VPY) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install -q -c build/llmc/constraints.txt torch==2.13.0
	$(LLMC_VENV)/bin/pip install -q -c build/llmc/constraints.txt llmcompressor==0.14.0.1 pytest
	touch $@

# The other tools beside ours: our checkpoints read by an independent GPTQ reader, and GPTQModel's and
# llm-compressor's own GPTQ run on our backend (tests/integrations), each in its venv.
interop: build $(INTEROP_VENV)/.ready $(LLMC_VENV)/.ready
	PYTHONPATH=$(CURDIR) $(INTEROP_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_checkpoint.py \
		tests/integrations/test_gptqmodel.py
	PYTHONPATH=$(CURDIR) $(LLMC_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/integrations/test_llmcompressor.py

bench: build
	$(VPY) -m benchmarks.run

# Whole-model GPTQ through GPTQModel and llm-compressor, their path vs our backend (SmolLM2-135M, CPU; the
# model and text come from `make demo`) → benchmarks/results/integrations-*-cpu.{json,md}.
bench-integrations: build $(INTEROP_VENV)/.ready $(LLMC_VENV)/.ready
	$(VPY) -c "from maca_kernels import embedded; embedded.ensure_all(install=True)"
	PYTHONPATH=$(CURDIR) $(INTEROP_VENV)/bin/python -m benchmarks.bench_integrations --tool gptqmodel
	PYTHONPATH=$(CURDIR) $(LLMC_VENV)/bin/python -m benchmarks.bench_integrations --tool llmcompressor

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
