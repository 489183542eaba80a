#!/usr/bin/env bash
# GPU check: one command, about 8 minutes on one H200, every part under its own timeout (one failing part loses
# only itself; gpu.md names it and its exit status, 124 = its timeout):
#   (a)+(b) benchmarks/gpu_throughput.py  ~110M params at 4k tokens in bf16: plain vs CLEX training tokens/s and MFU
#           (goal CLEX >= 0.95 x plain), SDPA flash vs flash-attn forward+backward, longest single forward
#   (c)     benchmarks/long_eval.py       the longest progressive-eval length that fits (when the script exists)
#   (d)     benchmarks/gpu_profile.py     300 pretraining steps of profiles/gpu.yaml in a copy of the repo, and
#                                         `clex evaluate base`: tokens/s, loss, the projected wall time of the profile
#   (e)     benchmarks/gpu_summary.py     build/benchmarks/gpu.json and gpu.md (a table to paste into README.md)
# Usage:  bash benchmarks/gpu_check.sh           (needs torch with CUDA; installs nothing but carried wheels)
#         GPU_CHECK_COPY=$OUT bash benchmarks/gpu_check.sh   (also copies the result files into that folder)
#         bash benchmarks/gpu_check.sh --smoke   (every part on CPU with tiny shapes, a few minutes: the tests' run)
# Wheels in .whl/ (benchmarks/gpu_wheels.sh fetches what a bare GPU image lacks) are installed into a temporary
# folder first. Timeouts (seconds) can be changed: T_THROUGHPUT, T_LONG_EVAL, T_PROFILE.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}   # PYTHON, else ./run's .venv, else python3 (a bare GPU image's)
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
DIR=${GPU_CHECK_OUT:-build/benchmarks}   # where every JSON goes (the tests use a temporary folder)
mkdir -p "$DIR"
rm -f "$DIR"/gpu_throughput.json "$DIR"/long_eval.json "$DIR"/gpu_profile.json "$DIR"/gpu_smi.txt
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/clex-site .whl/*.whl \
    && export PYTHONPATH=/tmp/clex-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
STATUS=$DIR/gpu_check.status
: > "$STATUS"
part() {  # part NAME SECONDS COMMAND...: run it under its timeout, record 'NAME exit-status seconds'
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (timeout ${limit} s): $*"
  timeout -k 15 "$limit" "$@"
  rc=$?
  echo "$name $rc $((SECONDS - start))" >> "$STATUS"
}
"$PY" -c "import clex.cli, clex.train, clex.data, mlflow" 2>/dev/null \
  || echo "gpu_check: a package is missing (every part imports clex.config: pydantic; part (d) also datasets and" \
     "mlflow; carry them: benchmarks/gpu_wheels.sh): $("$PY" -c "import clex.cli, clex.train, clex.data, mlflow" 2>&1 | tail -1)"
if [ "${1:-}" = --smoke ]; then
  part throughput "${T_THROUGHPUT:-300}" "$PY" benchmarks/gpu_throughput.py --smoke --json "$DIR/gpu_throughput.json"
  part profile "${T_PROFILE:-600}" "$PY" benchmarks/gpu_profile.py --steps 4 --timeout 540 \
    --overlay tests/gpu_profile_smoke.yaml --workdir "$DIR/gpu_profile_study" --json "$DIR/gpu_profile.json"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1 > "$DIR/gpu_smi.txt"
  part throughput "${T_THROUGHPUT:-120}" "$PY" benchmarks/gpu_throughput.py --json "$DIR/gpu_throughput.json"
  if [ -f benchmarks/long_eval.py ]; then
    part long_eval "${T_LONG_EVAL:-90}" "$PY" benchmarks/long_eval.py --device cuda --hf-shape tinyllama \
      --encoding clex --dtype bf16 --max-len 65536 --out "$DIR/long_eval.json"
  fi
  ratio=$("$PY" -c "import json; print(json.load(open('$DIR/gpu_throughput.json'))['clex_over_plain_tokens_per_s']['ratio'])" \
          2>/dev/null || echo 1.0)
  part profile "${T_PROFILE:-240}" "$PY" benchmarks/gpu_profile.py --steps 300 --clex-ratio "$ratio" \
    --timeout "$(( ${T_PROFILE:-240} - 15 ))" --workdir "$DIR/gpu_profile_study" --json "$DIR/gpu_profile.json"
fi
"$PY" benchmarks/gpu_summary.py --dir "$DIR"
echo "written: $DIR/gpu.json, $DIR/gpu.md"
if [ -n "${GPU_CHECK_COPY:-}" ]; then  # e.g. GPU_CHECK_COPY=$OUT on a lent machine: the results, not the study copy
  cp "$DIR"/gpu.json "$DIR"/gpu.md "$DIR"/gpu_check.status "$GPU_CHECK_COPY"/
  for f in gpu_throughput.json long_eval.json gpu_profile.json; do [ -f "$DIR/$f" ] && cp "$DIR/$f" "$GPU_CHECK_COPY"/; done
fi
awk '$2 != 0 {bad = 1} END {exit bad}' "$STATUS"   # exit 1 when a part failed or timed out (gpu.md names it)
