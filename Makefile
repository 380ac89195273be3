# Two commands do everything (see README.md):
#   make        set up .venv, train the tiny GPT on Shakespeare, print a sample
#   make test   set up .venv and the browser-test tools, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: all train test setup browser-deps benchmarks site
all: train

# Re-install only when the pins or the package metadata change.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) training.py

# Debian's chromium and the pinned Observable npm packages for the browser test.
browser-deps:
	bash tests/browser/setup.sh

test: setup browser-deps
	$(PY) -m pytest

benchmarks: setup
	$(PY) benchmarks/run.py

# Needs Quarto (https://quarto.org) and the internet; see README.md.
site: setup
	quarto render
