# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv (CPU torch pinned; ComfyUI users get torch from their host instead).
# `make test` then runs the host tests against a real ComfyUI checkout when there is one ($COMFYUI_PATH, else
# the fixed place /work/ComfyUI), in .venv-host (ComfyUI's requirements; torch/torchvision built for each other).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST_VENV := .venv-host
HOST_PY := $(HOST_VENV)/bin/python
HOST_STAMP := $(HOST_VENV)/.installed
COMFYUI_PATH ?= /work/ComfyUI
export COMFYUI_PATH

.PHONY: demo test core-test host-test bench distill-demo distill-eval clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

$(HOST_STAMP): requirements.txt requirements-host.txt
	$(PYTHON) -m venv $(HOST_VENV)
	$(HOST_PY) -m pip install --quiet --upgrade pip
	$(HOST_PY) -m pip install --quiet -r requirements-host.txt
	touch $(HOST_STAMP)

demo: $(STAMP)
	$(PY) -m xslim_lab.demo

test: core-test host-test

core-test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/host

host-test:
	@if [ -d "$(COMFYUI_PATH)/comfy" ]; then \
		$(MAKE) --no-print-directory $(HOST_STAMP) && $(HOST_PY) -m pytest -q -rs tests/host; \
	else \
		echo "No ComfyUI checkout at $(COMFYUI_PATH): the host tests skip (set COMFYUI_PATH to run them)."; \
		$(MAKE) --no-print-directory $(STAMP) && $(PY) -m pytest -q -rs tests/host; \
	fi

bench: $(STAMP)
	$(PY) -m xslim_lab.bench

distill-demo: $(STAMP)
	$(PY) -m xslim_lab.distill_demo --out runs/distill

distill-eval: $(STAMP)
	$(PY) -m xslim_lab.distill_evaluate --runs runs/distill

clean:
	rm -rf $(VENV) $(HOST_VENV)
