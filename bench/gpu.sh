#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (the README's GPU numbers come from it):
#   1. train.py --tiny on CUDA (bf16 autocast): a smoke run of the whole model on the GPU;
#   2. tests/test_kernels.py with a real GPU: the numba CUDA kernels against the grid_sample oracle (hypothesis);
#   3. bench/bench_mmfs.py --device cuda: the CUDA kernel beside grid_sample, times and peak memory;
#   4. train.py --small on the GPU, with what is left of BUDGET seconds minus the evaluation's share;
#   5. eval.py --n 64 on that checkpoint.
# Usage: bash bench/gpu.sh [LOGDIR] [BUDGET]   (LOGDIR collects gpu.log, eval.json, metrics.jsonl, the weights)
set -u -o pipefail
LOG=${1:-gpu-logs}
BUDGET=${2:-540}
PY=${PYTHON:-python3}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$LOG/gpu.log") 2>&1
run() {  # run SECONDS NAME CMD...: a section with its own time limit; its exit status is printed, not fatal
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s, at ${SECONDS}s)"
    timeout "$limit" "$@"
    echo "=== $name: exit $? after ${SECONDS}s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, numba; print('torch', torch.__version__, 'numba', numba.__version__, 'cuda', torch.cuda.is_available())"
run 100 "train.py --tiny on CUDA" $PY train.py --tiny --steps 4 --out /tmp/gpu-tiny
run 120 "kernel tests on the GPU" $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not simulator"
run 60 "bench_mmfs --device cuda" $PY bench/bench_mmfs.py --device cuda --repeats 20
run $((BUDGET - SECONDS - 100)) "train.py --small on the GPU" $PY train.py --small --out /tmp/gpu-small
run $((BUDGET - SECONDS - 5)) "eval.py --n 64" $PY eval.py --checkpoint /tmp/gpu-small --n 64 --out "$LOG/eval.json"
cp /tmp/gpu-small/metrics.jsonl /tmp/gpu-small/tokenizer.model "$LOG/" 2>/dev/null
# the weights in two parts (the device tool returns files of at most 16 MiB): cat model.part* > model.safetensors
[ -f /tmp/gpu-small/model.safetensors ] && split -b 15M -d /tmp/gpu-small/model.safetensors "$LOG/model.part"
ls -la "$LOG"
