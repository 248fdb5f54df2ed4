# sophon_fast developer entry points. `make test` works on a fresh machine: it creates .venv,
# installs the pinned toolchain, builds the extension and runs the whole suite; `make demo` then
# shows the algorithm end to end.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90
PYTEST_ARGS ?=
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: test test-noext sdist-check demo build cuda-check triton-check gpu-stack-check bench bench-quick lint clean

$(VENV)/.deps: requirements/dev.txt requirements/data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_PIN)"
	$(PIP) install -r requirements/dev.txt
	$(PIP) install --no-deps -r requirements/data.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: $(VENV)/.built
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest $(PYTEST_ARGS)

# Pre-train, protect and attack on the built-in offline domains (<= 10 minutes on 2 CPU cores).
DEMO_OUT ?= demo_out
demo: $(VENV)/.built
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/sophon-fast demo --out $(DEMO_OUT)

# The pure-Python install (SOPHON_FAST_NO_EXT=1): build a wheel without the extension, check it
# holds no compiled code, install it into a scratch folder and run the suite against that copy.
test-noext: $(VENV)/.deps
	rm -rf build/noext
	SOPHON_FAST_NO_EXT=1 $(PIP) wheel --no-build-isolation --no-deps -q -w build/noext .
	$(PY) -c "import glob, zipfile; names = zipfile.ZipFile(glob.glob('build/noext/*.whl')[0]).namelist(); bad = [n for n in names if n.endswith(('.so', '.pyd'))]; assert not bad, bad; print('pure-Python wheel:', len(names), 'files')"
	$(PIP) install --no-deps -q --target build/noext/site build/noext/*.whl
	cd build/noext && SOPHON_FAST_NO_EXT=1 PYTHONPATH=$(CURDIR)/build/noext/site \
		$(CURDIR)/$(PY) -c "import sophon_fast, sys; assert '/build/noext/site/' in sophon_fast.__file__, sophon_fast.__file__; print('testing', sophon_fast.__file__)"
	cd build/noext && SOPHON_FAST_NO_EXT=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$(CURDIR)/build/noext/site \
		$(CURDIR)/$(PY) -m pytest -p no:cacheprovider --rootdir=$(CURDIR) -c $(CURDIR)/pyproject.toml $(CURDIR)/tests $(PYTEST_ARGS)

# The source distribution: build it (setuptools' PEP 517 backend), check it holds every csrc/
# file, then in a fresh venv that links the installed torch (nothing downloaded) build the wheel
# from it with --no-build-isolation, install that and run a 2-step protect()
# (tests/reliability/_sdist_check.py).
sdist-check: $(VENV)/.deps
	OMP_WAIT_POLICY=PASSIVE $(PY) tests/reliability/_sdist_check.py build/sdist-check

# Compile every .cu of csrc/sources.txt with plain nvcc (no torch) for sm_80 and sm_90; any
# warning is an error.
cuda-check:
	@mkdir -p build/cuda-check
	@set -e; for src in $$(grep -E '^[^#].*\.cu$$' csrc/sources.txt); do \
		for arch in $(CUDA_ARCHS); do \
			echo "nvcc sm_$$arch $$src"; \
			$(NVCC) -std=c++17 -O3 -Icsrc -gencode arch=compute_$$arch,code=sm_$$arch \
				-Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
				-c $$src -o build/cuda-check/$$(basename $$src .cu).sm_$$arch.o; \
		done; \
	done; echo "cuda-check: every .cu compiled for sm_$(firstword $(CUDA_ARCHS)) and sm_$(lastword $(CUDA_ARCHS))"

# Compile every Triton kernel for sm_80 and sm_90 with the specialisations its launchers really
# produce (tools/triton_check.py: no GPU needed; fails on a compile error or a register spill).
# Writes only under build/triton-check. `make triton-check PY=/other/python` checks another
# environment (torch + triton) without building .venv.
TRITON_CHECK_JOBS ?= 2
TRITON_CHECK_ARGS ?=
triton-check: $(if $(filter command line,$(origin PY)),,$(VENV)/.deps)
	OMP_WAIT_POLICY=PASSIVE $(PY) tools/triton_check.py --jobs $(TRITON_CHECK_JOBS) $(TRITON_CHECK_ARGS)

# The GPU machine's stack on this CPU machine: .venv-gpu with torch==2.11.0 (+cu130, triton 3.6),
# the extension built there with its CUDA part (and once with it forced to fail: the CPU part must
# survive), make triton-check and the CPU suite under it (tools/gpu_stack_check.sh).
gpu-stack-check:
	PYTHON=$(PYTHON) tools/gpu_stack_check.sh

bench: $(VENV)/.built
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/run.py ops

bench-quick: $(VENV)/.built
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/run.py ops --quick

lint: $(VENV)/.deps
	$(PIP) install -q ruff clang-format
	$(VENV)/bin/ruff check sophon_fast tests benchmarks tools setup.py
	$(VENV)/bin/ruff format --check sophon_fast tests benchmarks tools setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

clean:
	rm -rf build dist *.egg-info sophon_fast/_C*.so sophon_fast/_C_cuda_build_error.txt $(VENV)/.built
