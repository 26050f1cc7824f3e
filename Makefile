# Two commands are the whole set-up: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# constraints/cpu.txt pins a CPU-friendly torch so pip never pulls a CUDA build by accident.
PIP_INSTALL := $(PIP) install --quiet --disable-pip-version-check -c constraints/cpu.txt
# the local wheel mirrors of some machines print one warning per package: keep the log readable
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl

.PHONY: help setup test test-all demo bench lint clean

help:
	@echo "make demo      scripted LIBERO demos -> train tiny-cpu -> official LIBERO eval (creates .venv)"
	@echo "make test      fast test suite (creates .venv)"
	@echo "make test-all  fast + slow end-to-end tests"
	@echo "make bench     every benchmark in bench/ -> bench/results.json and bench/results.md"
	@echo "make setup     only create .venv with the pinned CPU install"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (vla needs Python 3.11+)"; exit 1; }
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q 'libEGL.so.1'; then \
		echo "installing EGL (headless MuJoCo rendering)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libgl1 >/dev/null; fi
	@echo "creating $(VENV) (pinned CPU install, ~3 min on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[sim,dev,serve-eval]' 2>&1 | $(QUIET_PIP)
	@# lerobot 0.4.4 pins torch<2.11; its dataset code runs fine on the pinned torch, so install it alone.
	$(PIP_INSTALL) --no-deps lerobot==0.4.4 2>&1 | $(QUIET_PIP)
	@# openpi-client (drives vla.serve in the tests) pins numpy<2 but runs on numpy 2: install it alone too.
	$(PIP_INSTALL) --no-deps openpi-client==0.1.2 2>&1 | $(QUIET_PIP)
	$(PY) -c "import vla, torch, torchvision, timm, diffusers, accelerate, lerobot.datasets.lerobot_dataset, openpi_client.websocket_client_policy"
	@touch $@

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m vla.demo

bench: setup
	$(PY) bench/run.py

lint: setup
	$(PY) -m ruff check vla tests bench datasets eval train.py

clean:
	rm -rf $(VENV) .pytest_cache bench/_work
