#!/usr/bin/env bash
# The pivot benchmark's CUDA path, run on a GPU machine whose Python has PyTorch and Triton but
# not attnbench (no network there): attnbench is installed from this tree without dependencies,
# then the pivot runs twice, in bfloat16 with full.sdpa pinned to the flash kernel and in float32
# with PyTorch's own SDPA choice (flash takes no float32). Each run writes its JSON and its log.
#
# Usage: ATTNBENCH_GIT_COMMIT=$(git rev-parse HEAD) benchmarks/gpa_pivot_cuda.sh OUTDIR
set -euo pipefail
out=${1:?usage: benchmarks/gpa_pivot_cuda.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
python3 -m pip install --quiet --no-deps --no-build-isolation .
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    | tee "$out/nvidia-smi.csv"
export PYTHONUNBUFFERED=1
python3 benchmarks/gpa_pivot.py --device cuda --dtype bfloat16 --sdpa-backend flash \
    --min-run-time 1 --json "$out/gpa_pivot-cuda-bf16.json" 2>&1 | tee "$out/gpa_pivot-cuda-bf16.log"
python3 benchmarks/gpa_pivot.py --device cuda --dtype float32 \
    --min-run-time 1 --json "$out/gpa_pivot-cuda-fp32.json" 2>&1 | tee "$out/gpa_pivot-cuda-fp32.log"
