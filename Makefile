# vilseg: every target installs what it needs into .venv first (idempotent, fast on the second run).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.vilseg-installed
# torch first and pinned: an unpinned torch resolved early pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
MMCV_SPEC  ?= mmcv==2.1.0

.PHONY: install demo demo-ade demo-medical test test-fast clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip<26" "setuptools<70" wheel
	@# keep a CUDA torch that is already there (GPU machines); otherwise the pinned CPU wheel
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q "numpy<2.5" "mmengine==0.10.7" ninja psutil
	@# mmcv has no wheel for this torch: build its C++ ops from source (about 9 min once; pip caches the wheel)
	@# setuptools<70 again right before: other installs may lift it, and mmcv's setup.py imports pkg_resources
	@$(PY) -c "import mmcv.ops" 2>/dev/null || { $(PIP) install -q "setuptools<70" && MMCV_WITH_OPS=1 MAX_JOBS=2 $(PIP) install --no-build-isolation $(MMCV_SPEC); }
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	$(PY) -c "import vilseg, mmseg, mmcv.ops, monai, nibabel"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(PY) tools/demo.py

demo-ade: install
	$(PY) tools/demo.py --skip-medical

demo-medical: install
	$(PY) tools/demo.py --skip-ade

clean-venv:
	rm -rf $(VENV)
