#!/usr/bin/env bash
# The paper's shapes on a CUDA machine in <= 10 min: OPERA-CT embedding throughput, a Phi-2-sized
# stage-2 LoRA step in bf16 at batch 16, prefix-KV inference. One JSON line per figure on stdout.
#
#   benchmarks/gpu.sh [--only opera_ct,stage2_step,prefix_kv] [--smoke]
#
# Without a CUDA device it says so and exits 0 (--smoke runs toy sizes on the CPU instead).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
smoke=0
for a in "$@"; do [ "$a" = "--smoke" ] && smoke=1; done
if [ "$smoke" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA device visible to torch; nothing to measure (try --smoke for a CPU check)" >&2
    exit 0
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 600 "$PY" benchmarks/gpu.py "$@"
