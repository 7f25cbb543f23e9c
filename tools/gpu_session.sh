#!/usr/bin/env bash
# Issue 29's one prepared run for a lent GPU machine (15 device minutes in all, start-up
# included; one command may run 10 minutes): build, the GPU tests of the paths no GPU has run
# yet, then the device-time sweep under a time budget, most telling cases first. Everything
# lands in $OUT as it is made, so a run cut short still returns what it measured.
#
#   OUT=/path make gpu-session            # or: OUT=... bash tools/gpu_session.sh
#
# Budgets (seconds, env): BUILD_S 240, TEST_S 150 (+ 90 for the hardening run), SWEEP_S 240, then 75 for beam search
# (benchmarks starting later are skipped, the JSON is written). GPU_PY: the machine's python (torch, triton preinstalled).
set -u
OUT=${OUT:-gpu_session_results}
PY=${GPU_PY:-python3}
BUILD_S=${BUILD_S:-240}
TEST_S=${TEST_S:-150}
SWEEP_S=${SWEEP_S:-240}
mkdir -p "$OUT"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/session.log"; }

log "device: $(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1)"
log "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

log "build (budget ${BUILD_S}s)"
t=$SECONDS
timeout "$BUILD_S" env LASS_SPARSE_SKIP_CUDA_BUILD=0 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
log "build rc=$? in $((SECONDS - t))s"
"$PY" - >"$OUT/backends.txt" 2>&1 <<'EOF'
import torch, triton, lass_sparse as ls
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
for name, st in ls.backends().items():
    print(f"{name}: active={st['active']} {st['reason']}")
EOF

log "GPU tests of issue 29's new paths (budget ${TEST_S}s)"
# one hung test must not take the whole budget (pytest-timeout is on the GPU image)
TIMEOUT_OPT=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=90" || true)
t=$SECONDS
timeout "$TEST_S" "$PY" -m pytest -q -rfEs -p no:cacheprovider -m "gpu or triton" $TIMEOUT_OPT \
  tests/ops/test_triton_wt.py \
  tests/ops/test_cuda_kernels.py \
  tests/test_optim.py \
  tests/ops/test_segments.py \
  tests/nn/test_nn.py \
  "tests/ops/test_triton.py::test_capturable_adamw_kernel_bf16_on_gpu" \
  "tests/lass/test_device.py::test_training_steps_on_the_gpu_do_not_sync" \
  "tests/ops/test_determinism.py::test_training_ops_are_bit_identical_run_to_run_on_cuda" \
  "tests/ops/test_ops.py::test_training_calls_take_the_cpp_autograd_node" \
  "tests/ops/test_ops.py::test_qkv_training_calls_take_the_cpp_autograd_node" \
  "tests/ops/test_ops.py::test_masked_cast_training_calls_take_the_cpp_autograd_node" \
  --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
log "tests rc=$? in $((SECONDS - t))s: $(tail -n 1 "$OUT/tests.log")"
# every CUDA entry (new ones included) refuses wrong sizes with an exception, not a crash
t=$SECONDS
timeout 90 "$PY" -m pytest -q -p no:cacheprovider \
  "tests/ops/test_hardening_ops.py::test_every_registered_op_rejects_wrong_sizes_with_an_exception_not_a_signal" \
  >"$OUT/hardening.log" 2>&1
log "hardening rc=$? in $((SECONDS - t))s: $(tail -n 1 "$OUT/hardening.log")"

log "device-time sweep (budget ${SWEEP_S}s)"
t=$SECONDS
LASS_SPARSE_DEVICE_SWEEP=1 LASS_SPARSE_SWEEP_PRIORITY=1 LASS_SPARSE_BENCH_BUDGET_S="$SWEEP_S" \
  timeout $((SWEEP_S + 90)) "$PY" -m pytest benchmarks/test_device_time.py -m gpu -q -p no:cacheprovider \
  --benchmark-only --benchmark-json="$OUT/device.json" >"$OUT/sweep.log" 2>&1
log "sweep rc=$? in $((SECONDS - t))s: $(tail -n 1 "$OUT/sweep.log")"
if [ -s "$OUT/device.json" ]; then
  "$PY" benchmarks/report.py "$OUT/device.json" -o "$OUT/device.md" >>"$OUT/session.log" 2>&1
  log "report: $OUT/device.md"
  "$PY" tools/routes_from_sweep.py "$OUT/device.json" --dry >"$OUT/routes.txt" 2>&1
  log "routes (not written; run tools/routes_from_sweep.py on device.json to): $OUT/routes.txt"
fi

# beam search, one pair: the fused kernels vs materialized() vs dense (decides whether the CLI
# should materialize on GPUs by default); last, 75 s at most: it runs in the time left
t=$SECONDS
timeout 75 "$PY" -m pytest benchmarks/test_e2e.py -k "translate_batch and cuda" -m gpu -q \
  -p no:cacheprovider --benchmark-only --benchmark-json="$OUT/translate.json" \
  >"$OUT/translate.log" 2>&1
log "translate rc=$? in $((SECONDS - t))s: $(tail -n 1 "$OUT/translate.log")"

# Triton's compiled kernels for the next session (restore: TRITON_CACHE_DIR, tar x)
if [ -d "$TRITON_CACHE_DIR" ]; then
  tar czf "$OUT/triton-cache.tar.gz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
  size=$(stat -c %s "$OUT/triton-cache.tar.gz" 2>/dev/null || echo 0)
  if [ "$size" -gt $((15 * 1024 * 1024)) ]; then rm -f "$OUT/triton-cache.tar.gz"; fi
fi
log "done in ${SECONDS}s"
# the end of the output is what the device tool returns: the key rows, short
tail -n 4 "$OUT/tests.log" 2>/dev/null
[ -s "$OUT/device.json" ] && "$PY" benchmarks/report.py "$OUT/device.json" --summary 30
true
