#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a CUDA GPU (CI has none): the CUDA tests, the
# training-step benchmark (one run, CUDA graph against eager, ensembles up to 512, TF32) and the
# grokking epochs of 160 `quick` seeds, fused against the hooked model's forward (and TF32).
# Each part has its own time limit and log, so one failure does not lose the rest. About 6
# minutes on an H200 (docs/benchmarks.md). Needs the package and its test extra installed
# (pip install -e ".[test]"), or PYTHONPATH pointing at the checkout and its dependencies.
#
#     benchmarks/gpu_check.sh [OUT_DIR]        # logs in OUT_DIR (default /tmp/circuits-gpu)
set -u
cd "$(dirname "$0")/.."
out=${1:-/tmp/circuits-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc; } 2>&1 | tee "$out/machine.txt"
timeout "${TESTS_S:-150}" $py -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_ensemble.py tests/test_model.py 2>&1 | tee "$out/tests.txt" | tail -20
timeout "${BENCH_S:-150}" $py benchmarks/train_step.py --device cuda --preset nanda --steps 1000 \
    --repeats 3 --ensembles ${ENSEMBLES:-64 256 512} --tf32 2>&1 | tee "$out/train_step.txt"
timeout "${GROK_S:-240}" $py benchmarks/grok_seeds.py --device cuda --seeds "${SEEDS:-160}" ${GROK_TF32---tf32} \
    --out "$out/grok_seeds.csv" 2>&1 | tee "$out/grok_seeds.txt"
