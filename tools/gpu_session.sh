#!/usr/bin/env bash
# Issue 29's one prepared run for a lent GPU machine (15 device minutes in all, start-up
# included; one command may run 10 minutes): build, the GPU tests of the paths no GPU has run
# yet, then the device-time sweep under a time budget, most telling cases first. Everything
# lands in $OUT as it is made, so a run cut short still returns what it measured: the sweep
# appends each benchmark to device.partial.jsonl as it finishes (report.py and
# routes_from_sweep.py read it when device.json was never written).
#
#   OUT=/path make gpu-session            # or: OUT=... bash tools/gpu_session.sh
#
# The whole script ends by DEADLINE_S (default 540 s: give the device tool's run timeout_s
# >= DEADLINE_S + 20); each phase gets its own budget (env, seconds: BUILD_S 240, TEST_S 150,
# HARDEN_S 90, SWEEP_S 240, TRANSLATE_S 75), clipped to what the deadline leaves for the phases
# behind it (SWEEP_MIN 120 s kept for the sweep, TAIL_S 15 s for the report). A phase left
# under PHASE_MIN_S (20 s) is skipped and says so. GPU_PY: the machine's python (torch, triton preinstalled).
set -u
OUT=${OUT:-gpu_session_results}
PY=${GPU_PY:-python3}
DEADLINE_S=${DEADLINE_S:-540}
BUILD_S=${BUILD_S:-240}
TEST_S=${TEST_S:-150}
HARDEN_S=${HARDEN_S:-90}
SWEEP_S=${SWEEP_S:-240}
TRANSLATE_S=${TRANSLATE_S:-75}
SWEEP_MIN=${SWEEP_MIN:-120}  # the sweep's share the phases before it may not take
TAIL_S=${TAIL_S:-15}  # report, routes, cache archive and summary at the end
PHASE_MIN_S=${PHASE_MIN_S:-20}  # a phase given less is skipped
mkdir -p "$OUT"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/session.log"; }
# budget WANT RESERVE: WANT seconds, at most what the deadline leaves after RESERVE (>= 0)
budget() {
  local left=$((DEADLINE_S - SECONDS - $2))
  [ "$left" -lt 0 ] && left=0
  echo $(( $1 < left ? $1 : left ))
}
# phase NAME SECONDS: false (and a log line) when SECONDS is too short to start NAME
phase() {
  if [ "$2" -lt "$PHASE_MIN_S" ]; then log "$1 skipped: ${2}s left before the ${DEADLINE_S}s deadline"; return 1; fi
  log "$1 (budget ${2}s)"
}

log "device: $(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1)"
log "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

b=$(budget "$BUILD_S" $((SWEEP_MIN + TAIL_S)))
log "build (budget ${b}s)"
t=$SECONDS
timeout "$b" env LASS_SPARSE_SKIP_CUDA_BUILD=0 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
log "build rc=$? in $((SECONDS - t))s"
"$PY" - >"$OUT/backends.txt" 2>&1 <<'EOF'
import torch, triton, lass_sparse as ls
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
for name, st in ls.backends().items():
    print(f"{name}: active={st['active']} {st['reason']}")
EOF

# one hung test must not take the whole budget (pytest-timeout is on the GPU image)
TIMEOUT_OPT=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=90" || true)
b=$(budget "$TEST_S" $((SWEEP_MIN + TAIL_S)))
if phase "GPU tests of issue 29's new paths" "$b"; then
t=$SECONDS
timeout "$b" "$PY" -m pytest -q -rfEs -p no:cacheprovider -m "gpu or triton" $TIMEOUT_OPT \
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
fi
# every CUDA entry (new ones included) refuses wrong sizes with an exception, not a crash
b=$(budget "$HARDEN_S" $((SWEEP_MIN + TAIL_S)))
if phase "hardening" "$b"; then
t=$SECONDS
timeout "$b" "$PY" -m pytest -q -p no:cacheprovider \
  "tests/ops/test_hardening_ops.py::test_every_registered_op_rejects_wrong_sizes_with_an_exception_not_a_signal" \
  >"$OUT/hardening.log" 2>&1
log "hardening rc=$? in $((SECONDS - t))s: $(tail -n 1 "$OUT/hardening.log")"
fi

# the sweep: benchmarks starting after 3/4 of its budget are skipped (the rest lets the one
# running finish); a kill at the budget's end loses only that one (device.partial.jsonl)
b=$(budget "$SWEEP_S" $((TRANSLATE_S + TAIL_S)))
if phase "device-time sweep" "$b"; then
t=$SECONDS
LASS_SPARSE_DEVICE_SWEEP=1 LASS_SPARSE_SWEEP_PRIORITY=1 LASS_SPARSE_BENCH_BUDGET_S=$((b * 3 / 4)) \
  LASS_SPARSE_BENCH_PARTIAL="$OUT/device.partial.jsonl" \
  timeout "$b" "$PY" -m pytest benchmarks/test_device_time.py -m gpu -q -p no:cacheprovider \
  --benchmark-only --benchmark-json="$OUT/device.json" >"$OUT/sweep.log" 2>&1
log "sweep rc=$? in $((SECONDS - t))s: $(tail -n 1 "$OUT/sweep.log")"
fi
RESULTS="$OUT/device.json"
[ -s "$RESULTS" ] || RESULTS="$OUT/device.partial.jsonl"
if [ -s "$RESULTS" ]; then
  "$PY" benchmarks/report.py "$RESULTS" -o "$OUT/device.md" >>"$OUT/session.log" 2>&1
  log "report of $(basename "$RESULTS"): $OUT/device.md"
  "$PY" tools/routes_from_sweep.py "$RESULTS" --dry >"$OUT/routes.txt" 2>&1
  log "routes (not written; run tools/routes_from_sweep.py on $(basename "$RESULTS") to): $OUT/routes.txt"
fi

# beam search, one pair: the fused kernels vs materialized() vs dense (decides whether the CLI
# should materialize on GPUs by default); last, in the time left
b=$(budget "$TRANSLATE_S" "$TAIL_S")
if phase "beam search" "$b"; then
t=$SECONDS
LASS_SPARSE_BENCH_PARTIAL="$OUT/translate.partial.jsonl" \
  timeout "$b" "$PY" -m pytest benchmarks/test_e2e.py -k "translate_batch and cuda" -m gpu -q \
  -p no:cacheprovider --benchmark-only --benchmark-json="$OUT/translate.json" \
  >"$OUT/translate.log" 2>&1
log "translate rc=$? in $((SECONDS - t))s: $(tail -n 1 "$OUT/translate.log")"
fi

# Triton's compiled kernels for the next session (restore: TRITON_CACHE_DIR, tar x)
if [ -d "$TRITON_CACHE_DIR" ]; then
  tar czf "$OUT/triton-cache.tar.gz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
  size=$(stat -c %s "$OUT/triton-cache.tar.gz" 2>/dev/null || echo 0)
  if [ "$size" -gt $((15 * 1024 * 1024)) ]; then rm -f "$OUT/triton-cache.tar.gz"; fi
fi
log "done in ${SECONDS}s"
# the end of the output is what the device tool returns: the key rows, short
tail -n 4 "$OUT/tests.log" 2>/dev/null
[ -s "$RESULTS" ] && "$PY" benchmarks/report.py "$RESULTS" --summary 30
true
