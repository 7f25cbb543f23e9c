#pragma once
#include <ATen/ATen.h>

#include "common/entry.h"    // run_or_defer, registry_overload, contiguous
#include "common/message.h"  // LASS_CHECK

#include <cstdint>
#include <vector>

namespace lass_sparse_cpu {
using namespace lass_sparse_entry;  // NOLINT: the entries' helpers

inline int64_t num_words(int64_t k) { return (k + 31) / 32; }

// Argument checks every entry point runs before it touches memory. The dispatcher routes a call
// by device only; dtype, shape, numel and layout are the kernel's to check (TORCH_CHECK raises a
// RuntimeError in Python; a wrong size must never become an out-of-bounds read or write).
inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  LASS_CHECK(t.defined(), op, ": ", name, " is undefined");
  LASS_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ",
              t.device());
}

// `t` is a contiguous CPU tensor of `dtype` with exactly `sizes`.
inline void check_exact(const at::Tensor& t, const char* op, const char* name,
                        at::ScalarType dtype, at::IntArrayRef sizes) {
  check_cpu(t, op, name);
  LASS_CHECK(t.scalar_type() == dtype && t.sizes() == sizes, op, ": ", name, " must be ", dtype,
              sizes, ", got ", t.scalar_type(), t.sizes());
  LASS_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Packed mask of a [rows..., k] tensor: int32[rows..., ceil(k/32)], contiguous, on the CPU.
inline void check_bits(const at::Tensor& bits, at::IntArrayRef rows, int64_t k, const char* op,
                       const char* name = "bits") {
  std::vector<int64_t> want(rows.begin(), rows.end());
  want.push_back(num_words(k));
  check_exact(bits, op, name, at::kInt, want);
}

inline void check_float_2d(const at::Tensor& t, const char* op, const char* name) {
  check_cpu(t, op, name);
  LASS_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.sizes());
  const auto st = t.scalar_type();
  LASS_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op, ": ", name,
              " must be float32, float64 or bfloat16 (cpu kernels), got ", st);
  LASS_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}
}  // namespace lass_sparse_cpu
