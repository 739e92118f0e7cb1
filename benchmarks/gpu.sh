#!/usr/bin/env bash
# The benchmark table on one GPU in bf16 (about 3 minutes on an H100-class GPU). Run from the repo
# root in an environment where `pip install -e ".[hf]"` has been done with a CUDA build of torch.
# Flags are passed on to run.py after these, so they win: `PYTHON=.venv/bin/python benchmarks/gpu.sh
# --smoke --device cpu` is a dry run of the whole table on a CPU (tests/test_benchmarks.py checks the flags).
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" benchmarks/run.py --device cuda --dtype bfloat16 --reps 20 --warmup 3 "$@"
