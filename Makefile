# Two commands for a new user: `make demo` and `make test`. Everything else is a helper.
PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
# Two cores here: keep torch from oversubscribing them.
export OMP_NUM_THREADS ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test prepare clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

# The whole pipeline on CPU with the phantom; re-running resumes / skips finished work.
demo: venv
	@echo "== prepare: phantom + prepared dataset" && $(PY) prepare_data.py --config $(CONFIG)
	@echo "== stage 1: PA-MAE" && $(PY) train_ecg.py --config $(CONFIG)
	@echo "== stage 2: 3D-VAE + latents + template" && $(PY) train_disentangle_vae3d.py --config $(CONFIG)
	@echo "== stage 3: flow" && $(PY) train_flow.py --config $(CONFIG)
	@echo "== stage 4: generate the phantom test split" && $(PY) infer_flow.py --config $(CONFIG) --ecg split:test
	@echo "== stage 4: generate from the five real PTB-XL ECGs" && \
	  $(PY) infer_flow.py --config $(CONFIG) --ecg examples/ecg --out runs/demo/samples_ptbxl
	@echo "== evaluation" && $(PY) evaluation.py --config $(CONFIG) --real split:test --fake runs/demo/samples
	@echo "== done: see runs/demo/eval/report.md and runs/demo/samples/previews/"

prepare: venv
	$(PY) prepare_data.py --config $(CONFIG)

clean-demo:
	rm -rf runs/demo
