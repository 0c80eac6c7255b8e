#!/usr/bin/env bash
# The GPU proof on a GPU machine, one line (run from anywhere; the repo copy must hold wheels/,
# made on a CPU machine by `.venv/bin/python benchmarks/gpu_suite.py --prepare`):
#   bash benchmarks/gpu_suite.sh [extra gpu_suite.py options, e.g. --budget 400 --only tput_mixed,baseline]
# Uses the machine's own Python and torch; results in $OUT (default ./gpu_suite_out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(command -v python3 || command -v python)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # megatron_ext from this copy (nothing is installed there)
exec "$PY" benchmarks/gpu_suite.py --install-carried "$@"
