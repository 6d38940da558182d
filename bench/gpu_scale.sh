#!/usr/bin/env bash
# Does more data per step move captions and text-to-image? The small recipe at a fixed number of steps with 2, 8
# and 16 sequences per step, trained side by side on one GPU (a step is bound by Python and kernel launches there,
# not by the GPU, so three processes share it), each then scored by eval.py on 256 held-out stories.
#   A starts WARM seconds ahead (its tokenizer and first compiles alone); metrics.jsonl gives each run's step times.
#   A run still going at the deadline is stopped; eval.py then scores its last checkpoint (its step is printed).
# Usage: bash bench/gpu_scale.sh [LOGDIR] [STEPS] [BUDGET]
# LOGDIR gets gpu.log and results.tar.gz (eval JSONs, metrics, tokenizers), and B's and C's weights in 15 MB parts
# (cat C.model.part* > model.safetensors).
set -u -o pipefail
LOG=${1:-gpu-logs}
STEPS=${2:-1000}
BUDGET=${3:-570}
WARM=${WARM:-45}
EVAL_N=${EVAL_N:-256}
PY=${PYTHON:-python3}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 NUMBA_NUM_THREADS=4
exec > >(tee -a "$LOG/gpu.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, numba; print('torch', torch.__version__, 'numba', numba.__version__, 'cuda', torch.cuda.is_available())"
train() {  # train NAME BATCH: the small recipe, STEPS steps, batch BATCH, until the training deadline
    local name=$1 batch=$2
    timeout $((BUDGET - 75 - SECONDS)) $PY train.py --small --steps "$STEPS" --batch-size "$batch" --save-every 100 \
        --out "/tmp/$name" > "/tmp/$name.log" 2>&1
    echo "=== $name (batch $batch): exit $? at ${SECONDS}s; $(tail -c 300 /tmp/$name.log | tr '\r' '\n' | grep -a step | tail -1)"
}
train A 2 & pids=($!)  # (a bare `wait` would also wait for the tee above, forever)
sleep $WARM
train B 8 & pids+=($!)
train C 16 & pids+=($!)
wait "${pids[@]}"
pids=()
for name in A B C; do  # score all three at once: 256 stories each, DDIM 20, guidance 3 (the README's setting)
    [ -f "/tmp/$name/model.safetensors" ] || continue
    echo "=== $name last checkpoint: step $($PY -c "import json; print(json.load(open('/tmp/$name/train/state.json'))['step'])")"
    timeout $((BUDGET - 10 - SECONDS)) $PY eval.py --checkpoint "/tmp/$name" --n "$EVAL_N" --out "/tmp/$name/eval.json" \
        > "/tmp/$name.eval.log" 2>&1 & pids+=($!)
done
wait "${pids[@]}"
for name in A B C; do echo "=== $name eval"; tail -n 30 "/tmp/$name.eval.log"; done
tar czf "$LOG/results.tar.gz" -C /tmp A.log B.log C.log A.eval.log B.eval.log C.eval.log \
    $(cd /tmp && ls -d {A,B,C}/{eval.json,metrics.jsonl,tokenizer.model,train/state.json} 2>/dev/null)
for name in B C; do  # the device tool returns files of at most 16 MiB
    [ -f "/tmp/$name/model.safetensors" ] && split -b 15M -d "/tmp/$name/model.safetensors" "$LOG/$name.model.part"
done
ls -la "$LOG"
echo "done at ${SECONDS}s"
