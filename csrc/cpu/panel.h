#pragma once
// bf16 backward kernels with AVX512-BF16 dot products (panel_bf16.cpp). Callers check
// has_avx512_bf16() and the dtypes and shapes (2-D, contiguous, bits int32[N, ceil(K/32)]).
#include <ATen/ATen.h>

namespace lass_sparse_cpu {
// dw (bf16 [N, K]) = (dyᵀ x) ⊙ M for dy [M, N], x [M, K]; off-mask entries exactly 0.
void dw_panel_bf16(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits,
                   at::Tensor& dw);
// dx (bf16 [M, K]) = dy (W ⊙ M) for dy [M, N], W [N, K].
void dx_panel_bf16(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits,
                   at::Tensor& dx);
}  // namespace lass_sparse_cpu
