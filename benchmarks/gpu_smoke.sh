#!/usr/bin/env bash
# Every stage at tiny size on CUDA in bf16 (2-process DDP when 2 GPUs are visible), then each stage's
# training step and generation at ukb.yaml sizes: steps/s, videos/s and peak memory beside the plan
# of benchmarks/gpu_plan.py.
#
#   bash benchmarks/gpu_smoke.sh                 # from the repository root, venv in .venv
#   PY=python GPUS=1 bash benchmarks/gpu_smoke.sh
#
# The tiny part writes runs/gpu_smoke/ and is bounded to 5 minutes; the paper-size part takes a
# few minutes more (model construction, warm-up, 10 steps per stage).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/gpu_smoke}
GPUS=${GPUS:-$($PY -c "import torch; print(min(torch.cuda.device_count(), 2))")}
if [ "$GPUS" -lt 1 ]; then
    echo "gpu_smoke: no CUDA device visible (torch.cuda.device_count() == 0)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"

TINY=(run_dir=$RUN device=cuda data.phantom_n=24
      ecg.max_steps=20 ecg.batch_size=8 ecg.val_every=1
      vae.max_steps=20 vae.batch_size=2 vae.val_every=1
      flow.max_steps=20 flow.batch_size=4 flow.val_every=1 flow.val_subjects=4 flow.grad_checkpoint=true
      infer.batch_size=4 infer.guidance=2.0)
if [ "$GPUS" -ge 2 ]; then
    TRAIN=($PY -m torch.distributed.run --standalone --nproc_per_node "$GPUS")
else
    TRAIN=($PY)
fi
stage() {   # stage <name> <command...>: time it, stop the smoke run on the first failure
    local name=$1; shift
    local t0=$SECONDS
    "$@"
    echo "== $name: ok in $((SECONDS - t0)) s"
}
tiny() {
    stage prepare "$PY" prepare_data.py --config configs/demo.yaml "${TINY[@]}"
    stage "stage 1 PA-MAE ($GPUS GPU)" "${TRAIN[@]}" train_ecg.py --config configs/demo.yaml --fresh "${TINY[@]}"
    stage "stage 2 VAE + latents ($GPUS GPU)" "${TRAIN[@]}" train_disentangle_vae3d.py --config configs/demo.yaml \
        --fresh "${TINY[@]}"
    stage "stage 3 flow ($GPUS GPU)" "${TRAIN[@]}" train_flow.py --config configs/demo.yaml --fresh "${TINY[@]}"
    stage "stage 4 generation" "$PY" infer_flow.py --config configs/demo.yaml --ecg examples/ecg \
        --out "$RUN/samples_smoke" "${TINY[@]}"
}
export -f stage tiny
export PY GPUS RUN
TINY_STR="${TINY[*]}"; TRAIN_STR="${TRAIN[*]}"
timeout 300 bash -c "TINY=($TINY_STR); TRAIN=($TRAIN_STR); tiny"
echo "== tiny pipeline on CUDA: ok"

echo "== paper size (configs/ukb.yaml), one GPU"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} $PY benchmarks/gpu_plan.py --config configs/ukb.yaml --measure
