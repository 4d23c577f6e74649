# fastmtl developer commands. `make test` and `make demo` set everything up from nothing (a .venv/ at the repo
# root, Python 3.11); later runs reuse .venv/ and rebuild only the sources that changed.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
DEV_DEPS := pytest pytest-benchmark hypothesis numpy tqdm matplotlib scikit-learn ninja setuptools wheel
# Tests and benchmarks import the installed package, never the source tree (-P: no cwd on sys.path).
PYTEST := $(PY) -P -m pytest
SOURCES := $(shell find setup.py pyproject.toml csrc fastmtl kernels -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.toml' \) 2>/dev/null)
BENCH_JSON := .benchmarks/latest.json
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/$(VENV)/inductor-cache

.PHONY: test demo bench gpu-check install clean

$(VENV)/.deps-stamp:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION) $(DEV_DEPS)
	touch $@

$(VENV)/.install-stamp: $(VENV)/.deps-stamp $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps .
	touch $@

install: $(VENV)/.install-stamp

test: install
	$(PYTEST) -q

demo: install
	$(VENV)/bin/fastmtl info
	$(VENV)/bin/fastmtl bench --quick
	$(VENV)/bin/fastmtl train --out runs/demo

bench: install
	mkdir -p .benchmarks
	$(PYTEST) benchmarks --benchmark-only --benchmark-json=$(BENCH_JSON) -q
	$(PY) -P benchmarks/report.py $(BENCH_JSON)

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build dist *.egg-info $(VENV)/.install-stamp
