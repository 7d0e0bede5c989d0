# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv (CPU torch pinned; ComfyUI users get torch from their host instead).
# `make test` then runs the host tests against every real ComfyUI checkout it finds: 0.3.64 at $COMFYUI_PATH
# (else the fixed place /work/ComfyUI) in .venv-host, and 0.28.0 at that path plus -0.28 in .venv-host-0.28,
# the same test code on each, one line of counts per host. The slow end-to-end cases run once, on the newest
# host present; the 0.28 host's browser tests use the newest frontend (1.58.1). `make test-quick`: the core
# suite without its slow cases, no host (a few minutes, for daily work).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST_VENV := .venv-host
HOST_PY := $(HOST_VENV)/bin/python
HOST_STAMP := $(HOST_VENV)/.installed
COMFYUI_PATH ?= /work/ComfyUI
COMFYUI_028 := $(COMFYUI_PATH)-0.28
HOST_VENV_028 := .venv-host-0.28
HOST_PY_028 := $(HOST_VENV_028)/bin/python
HOST_STAMP_028 := $(HOST_VENV_028)/.installed
FRONTEND_NEW := 1.58.1
FRONTEND_DIR := .frontend-$(FRONTEND_NEW)
FRONTEND_STAMP := $(FRONTEND_DIR)/.installed
export COMFYUI_PATH

.PHONY: demo test test-quick check lint package-check core-test host-test bench distill-demo distill-eval clean

# the pack's packages are installed editable (no dependencies: they come from the requirements files), so tests and
# scripts import them as a user's `pip install .` would; ComfyUI itself loads the folder without installing it
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(HOST_STAMP): requirements.txt requirements-host.txt pyproject.toml
	$(PYTHON) -m venv $(HOST_VENV)
	$(HOST_PY) -m pip install --quiet --upgrade pip
	$(HOST_PY) -m pip install --quiet -r requirements-host.txt
	$(HOST_PY) -m pip install --quiet --no-deps -e .
	touch $(HOST_STAMP)

$(HOST_STAMP_028): requirements.txt requirements-host-0.28.txt
	$(PYTHON) -m venv $(HOST_VENV_028)
	$(HOST_PY_028) -m pip install --quiet --upgrade pip
	$(HOST_PY_028) -m pip install --quiet -r requirements-host-0.28.txt
	$(HOST_PY_028) -m pip install --quiet --no-deps torchaudio==2.11.1
	$(HOST_PY_028) -m pip install --quiet --no-deps -e .
	touch $(HOST_STAMP_028)

# the newest frontend, served by ComfyUI's --front-end-root (its files only, outside any environment)
$(FRONTEND_STAMP):
	$(PYTHON) -m pip install --quiet --no-deps --target $(FRONTEND_DIR) comfyui-frontend-package==$(FRONTEND_NEW)
	touch $(FRONTEND_STAMP)

demo: $(STAMP)
	$(PY) -m xslim_lab.demo

test: check core-test host-test

# The habits CI keeps: ruff (bug-finding rules, pyproject [tool.ruff]) over the repository, ruff's formatter and mypy
# over the engine and trainer packages (the demo model formatted too), and `pip install .` into a fresh environment
# (torch first: the host provides it).
FORMATTED := xslim_core distill_core xslim_demo
check: lint package-check

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check $(FORMATTED)
	$(VENV)/bin/mypy -p xslim_core -p distill_core

PACKAGE_VENV := out/package-check-venv
package-check:
	@rm -rf $(PACKAGE_VENV); mkdir -p out; $(PYTHON) -m venv $(PACKAGE_VENV)
	$(PACKAGE_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(PACKAGE_VENV)/bin/python -m pip install --quiet .
	cd out && ../$(PACKAGE_VENV)/bin/python -m xslim_lab.package_check
	@rm -rf $(PACKAGE_VENV)

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests --ignore=tests/host

core-test: $(STAMP)
	@start=$$(date +%s); $(PY) -m pytest -q tests --ignore=tests/host; status=$$?; \
	echo "core tests: $$(( $$(date +%s) - start )) s"; exit $$status

# Every host found runs; the suite fails if any did. The once-only end-to-end cases (marked `once`) run on the
# 0.28 host when it is there, else on 0.3.64.
host-test:
	@status=0; found=0; \
	if [ -d "$(COMFYUI_PATH)/comfy" ]; then found=1; \
		once=$$([ -d "$(COMFYUI_028)/comfy" ] && echo 1 || echo 0); \
		$(MAKE) --no-print-directory $(HOST_STAMP) && \
		XSLIM_SKIP_ONCE=$$once bash tests/host/run_host.sh 0.3.64 "$(COMFYUI_PATH)" $(HOST_PY) || status=1; \
	fi; \
	if [ -d "$(COMFYUI_028)/comfy" ]; then found=1; \
		$(MAKE) --no-print-directory $(HOST_STAMP_028) $(FRONTEND_STAMP) && \
		XSLIM_FRONTEND_ROOT="$(CURDIR)/$(FRONTEND_DIR)/comfyui_frontend_package/static" \
		bash tests/host/run_host.sh 0.28.0 "$(COMFYUI_028)" $(HOST_PY_028) || status=1; \
	fi; \
	if [ $$found = 0 ]; then \
		echo "No ComfyUI checkout at $(COMFYUI_PATH) or $(COMFYUI_028): the host tests skip (see the README to make them)."; \
		$(MAKE) --no-print-directory $(STAMP) && $(PY) -m pytest -q -rs tests/host || status=1; \
	fi; \
	exit $$status

bench: $(STAMP)
	$(PY) -m xslim_lab.bench

distill-demo: $(STAMP)
	$(PY) -m xslim_lab.distill_demo --out runs/distill

distill-eval: $(STAMP)
	$(PY) -m xslim_lab.distill_evaluate --runs runs/distill

clean:
	rm -rf $(VENV) $(HOST_VENV) $(HOST_VENV_028) $(FRONTEND_DIR)
