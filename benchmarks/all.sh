#!/usr/bin/env bash
# Every CPU benchmark, each printing a table of ratios against plain RoPE / the reference solve and
# writing JSON under build/benchmarks/. Run through ./run:  ./run bash benchmarks/all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/step_time.py --steps 40 --json build/benchmarks/step_time.json
python benchmarks/ode_solver.py
python benchmarks/inference.py
python benchmarks/generate.py
