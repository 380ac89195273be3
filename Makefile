# Two commands do everything (see README.md):
#   make        set up .venv, train the tiny GPT on Shakespeare, print a sample
#   make test   set up .venv and the browser-test tools, run the whole test suite, then replay
#               every lesson and solution notebook a second time under other CPU kernels
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Which torch build: auto (keep an installed build of the pinned version; else PyPI's CUDA wheel
# where an NVIDIA driver is found, else the CPU-only wheel), cpu or cuda. See course/torch_choice.py.
TORCH  ?= auto

.PHONY: all train test setup browser-deps sandbox-deps benchmarks site
all: train

# Re-install only when the pins, the package metadata or the TORCH setting change.
$(VENV)/.installed: requirements.txt pyproject.toml course/torch_choice.py $(VENV)/.torch-$(TORCH)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) course/torch_choice.py --torch $(TORCH) --install
	$(PY) -m pip install -r requirements.txt
	touch $@

# Marks the TORCH setting of the last install, so that `make TORCH=cpu` re-runs it.
$(VENV)/.torch-%:
	mkdir -p $(VENV)
	rm -f $(VENV)/.torch-*
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) training.py

# Debian's bubblewrap, the grader's sandbox (exercises/sandbox.py).
sandbox-deps:
	bash tests/sandbox_setup.sh

# Debian's chromium and the pinned Observable npm packages for the browser test.
browser-deps:
	bash tests/browser/setup.sh

# A second CPU-kernel setting for the notebook replay: no SIMD kernels in ATen, SSE4.2 in MKL,
# one thread (the first pass uses the CPU's best kernels and every core). Both change the low
# bits of matmuls and reductions, so a stored output that is a raw short-run loss fails here.
# Being single-threaded, this replay runs one notebook per core (pytest-xdist; a notebook's cells
# stay together in one kernel with --dist loadfile).
PORTABLE_CPU := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 OMP_NUM_THREADS=1

test: setup browser-deps sandbox-deps
	$(PY) -m pytest
	$(PORTABLE_CPU) $(PY) -m pytest --numprocesses auto --dist loadfile lessons solutions

benchmarks: setup
	$(PY) benchmarks/run.py

# Needs Quarto (https://quarto.org) and the internet; see README.md.
site: setup
	quarto render
