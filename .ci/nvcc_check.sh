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
