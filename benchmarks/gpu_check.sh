#!/usr/bin/env bash
# GPU check, under 5 minutes on one GPU: bf16, SDPA's flash backend (and flash-attn when installed),
# a ~110M-parameter decoder at 4k tokens, plain vs CLEX training tokens/s and MFU, the longest eval
# length that fits. Needs torch with CUDA: this script does not install anything.
#   bash benchmarks/gpu_check.sh            (writes build/benchmarks/gpu.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
PYTHONPATH=$PWD timeout 300 "$PY" benchmarks/gpu_throughput.py "$@"
