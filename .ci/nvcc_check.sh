#!/usr/bin/env bash
# Compile-check every torch-free CUDA source with nvcc (no GPU needed).
set -euo pipefail
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda-13.0/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "nvcc-check: nvcc not found; skipping CUDA compile check"; exit 0; fi
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "nvcc-check: no csrc/cuda/*.cu files"; exit 0; fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for arch in sm_80 sm_90; do
  for f in "${files[@]}"; do
    "$NVCC" -std=c++17 -O3 -arch=$arch -Icsrc -c "$f" -o "$tmp/$(basename "$f").$arch.o"
    echo "nvcc-check: $f ($arch) ok"
  done
done
# Triton: every kernel variant x autotuning candidate at BLOCK_M=128 (the most resources), lowered to cubin for sm_80 and
# sm_90 with the real launch signature; fails if a candidate does not fit (shared memory,
# registers, spills). Prints registers / spills / shared memory per candidate.
PY=${PY:-.venv/bin/python}
if [ -x "$PY" ] && "$PY" -c "import triton" 2>/dev/null; then
  env -u TRITON_INTERPRET "$PY" -W ignore -m lass_sparse.backends.triton.aot_check \
    --arch 80 90 --dtype bf16 fp32 tf32 --all-configs --max-bucket-only | tail -n 3
  # issue 29's "W as A" kernels (kernels_wt.py), every candidate, bf16 on sm_90 (~1 min)
  env -u TRITON_INTERPRET "$PY" -W ignore -m lass_sparse.backends.triton.aot_check \
    --wt --arch 90 --dtype bf16 | tail -n 1
  echo "nvcc-check: triton aot_check ok"
fi
