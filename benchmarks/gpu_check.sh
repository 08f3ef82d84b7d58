#!/usr/bin/env bash
# The GPU path in one go, for a machine with an NVIDIA GPU (CI never has one): CUDA tests, AMP, the guided
# filter, attack and training-step benchmarks at 224 px, and a short 224 px training run of the method.
# Usage: OUT=some/folder bash benchmarks/gpu_check.sh   (results and logs land in $OUT)
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() { echo; echo "== $1 ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, timm, cv2; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| timm', timm.__version__, '| cv2', cv2.__version__)"

step "CUDA tests"
$PY -m pytest -q -p no:cacheprovider -k "cuda or amp or autocast" tests/test_prior.py tests/test_attacks.py \
    tests/test_trainer.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -5

step "guided filter, 224 px, batch 64"
$PY benchmarks/guided_filter.py --device cuda --cpu-reference benchmarks/results/guided_filter_cpu.json \
    --out "$OUT/guided_filter_cuda.json"

if [ -n "${WITH_ATTACKS:-}" ]; then
step "PGD-10 against torchattacks and the floor, bf16/fp16 autocast"
$PY benchmarks/attacks.py --device cuda --amp --repeats 5 --out "$OUT/attacks_cuda.json" | tail -8
fi

step "training step of every method, 224 px, batch 64"
$PY benchmarks/train_step.py --device cuda --size 224 --batch 64 --steps 5 --out "$OUT/train_step_cuda_224px.json"

step "a short 224 px run of the method (colab preset, AMP, channels-last)"
$PY -m robustmed_lite train --config colab --method robustmed --epochs 2 --n_train 1024 --n_val 256 \
    --n_test 256 --eval_n 256 --progress false --out_dir /tmp/run_robustmed_224 && cp /tmp/run_robustmed_224/log.csv "$OUT/run_log.csv"
echo "== done ($(date +%T))"
