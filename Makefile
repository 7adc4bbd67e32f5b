# Two commands on a fresh machine:
#   make speedrun   set up .venv, then train the default (tiny preset on CPU, minutes)
#   make test       set up .venv, then run the CPU test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup speedrun test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile tools/setup_venv.sh
	bash tools/setup_venv.sh $(VENV) $(PYTHON)
	touch $(STAMP)

speedrun: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
