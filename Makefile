# Two commands for a new user: `make demo` and `make test`. Everything else is a helper.
PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
# Two cores here: keep torch from oversubscribing them.
export OMP_NUM_THREADS ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test phantom prepare ecg vae flow infer eval clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

# The whole pipeline on CPU with the phantom; re-running resumes / skips finished work.
demo: venv prepare

phantom prepare: venv
	$(PY) prepare_data.py --config $(CONFIG)

clean-demo:
	rm -rf runs/demo
