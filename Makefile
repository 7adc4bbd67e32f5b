# Two commands on a fresh machine:
#   make speedrun   set up .venv (training's packages), train the default (tiny preset on CPU, minutes), plot it
#   make test       add the test suite's packages to .venv (the dev extra), then run the CPU test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=
SPEEDRUN_DIR ?= runs/tiny
PYTEST_ARGS ?=

# Wheels that bench/gpu_check.sh installs on a bare GPU machine (pure Python: any platform).
# ftfy (and its wcwidth): the prompt cleaning of prx.text, which the bare GPU machine lacks
GPU_WHEELS := liger-kernel==0.8.5 ftfy==6.3.1 wcwidth==0.9.4

.PHONY: setup speedrun test gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile tools/setup_venv.sh  # what training needs
	bash tools/setup_venv.sh $(VENV) $(PYTHON)
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)  # and the test suite's packages (the dev extra)
	bash tools/setup_venv.sh $(VENV) $(PYTHON) dev
	touch $(DEV_STAMP)

# The speedrun's processes (setup's check, train.py, the plot) share modules: where the shell sets
# PYTHONDONTWRITEBYTECODE, each would compile them from source again.
speedrun: export PYTHONDONTWRITEBYTECODE :=
speedrun: $(STAMP)  # then the run's plots: SPEEDRUN_DIR/plots/*.png
	$(PY) train.py --run-dir $(SPEEDRUN_DIR) $(ARGS)
	$(PY) -m prx.plot $(SPEEDRUN_DIR)

test: $(DEV_STAMP)  # PRX_REQUIRE_DEV: a missing dev dependency fails its tests instead of skipping them
	PRX_REQUIRE_DEV=1 $(PY) -m pytest -q $(PYTEST_ARGS)

gpu-wheels:  # into .whl/ (git-ignored), to carry along to the GPU check
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs .pytest_cache
