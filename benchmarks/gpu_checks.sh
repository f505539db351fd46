#!/usr/bin/env bash
# The GPU device checks of issue 18.4, as one short script (not run by CI: it needs CUDA).
# From the repository root on a machine with a GPU and torch (no install needed: it runs from src/):
#   OUT=benchmarks/results/gpu bash benchmarks/gpu_checks.sh
# Writes into $OUT: gpu_checks.json (AMP with a GradScaler in float16, bfloat16; no host sync per step),
# overhead_cuda.json and .md (overhead.py --device cuda), floors.json (microbatch <= 1.02x the same
# accumulation loop, per_example <= 1.3x a plain step, transformer). About 3-5 minutes on an H100.
# Exit status 1 if a check failed; every step still runs.
set -u
OUT=${OUT:-benchmarks/results/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt" || status=1
$PY benchmarks/gpu_checks.py --device cuda --json "$OUT/gpu_checks.json" || status=1
$PY benchmarks/overhead.py --device cuda --models transformer mlp cnn \
    --methods plain accum microbatch reads per_example --repeats 11 \
    --json "$OUT/overhead_cuda.json" --markdown "$OUT/overhead_cuda.md" || status=1
$PY benchmarks/gpu_checks.py --floors "$OUT/overhead_cuda.json" --json "$OUT/floors.json" || status=1
exit $status
