# vilseg: every target installs what it needs into .venv first (idempotent, fast on the second run).
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.vilseg-installed
# torch first and pinned: an unpinned torch resolved early pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
MMCV_SPEC  ?= mmcv==2.1.0
# test processes (pytest-xdist); each computes with one torch thread (tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: install demo demo-ade demo-medical test test-fast clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard vilseg/ops/csrc/*) Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# setuptools: torch needs >= 77.0.3, mmengine's run-time pkg_resources import needs < 81
	$(PIP) install -q --upgrade "pip<26" wheel "setuptools>=77.0.3,<81"
	@# keep a CUDA torch that is already there (GPU machines); otherwise the pinned CPU wheel
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q "numpy<2.5" "mmengine==0.10.7" ninja psutil
	@# mmcv has no wheel for this torch: build its C++ ops from source (about 9 min once; pip caches the wheel)
	@# mmcv 2.1.0's setup.py builds only with setuptools < 70: lowered for that build alone, restored right after
	@$(PY) -c "import mmcv.ops" 2>/dev/null || { \
	  echo "building mmcv 2.1.0 with its C++ ops (about 9 min once); setuptools is held below 70 for this build only"; \
	  $(PIP) install -q "setuptools<70" 2>&1 | grep -v -e "dependency resolver does not currently" -e "requires setuptools>=77" || true; \
	  MMCV_WITH_OPS=1 MAX_JOBS=2 $(PIP) install -q --no-build-isolation $(MMCV_SPEC) 2>&1 | grep -v -e "dependency resolver does not currently" -e "requires setuptools>=77"; \
	  test $${PIPESTATUS[0]} -eq 0; }
	$(PIP) install -q "setuptools>=77.0.3,<81"
	@# vilseg itself, with its native extension vilseg.ops._native (C++, about 70 s; setup.py)
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	$(PY) -c "import vilseg, vilseg.ops._native, mmseg, mmcv.ops, monai, nibabel"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

demo: install
	$(PY) tools/demo.py

demo-ade: install
	$(PY) tools/demo.py --skip-medical

demo-medical: install
	$(PY) tools/demo.py --skip-ade

clean-venv:
	rm -rf $(VENV)
