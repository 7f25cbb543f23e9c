// segmented_masked_linear on the CPU: rows grouped by pair, one pass over W's row tiles for
// every segment (panel_fp32.cpp for fp32 with AVX-512, amx_bf16.cpp for bf16 with AMX, else
// tiled.cpp); its entry under the public name.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linear.h"

namespace lass_sparse_cpu {

// Mixed-pair batch: rows [seg_offsets[s], seg_offsets[s+1]) of x use pair seg_pair[s]'s mask
// (one pass over W's tiles for all segments: tiled_segments).
at::Tensor segmented_masked_linear(const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& bits_bank, const at::Tensor& seg_offsets,
                                   const at::Tensor& seg_pair,
                                   const c10::optional<at::Tensor>& bias) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "segmented_masked_linear";
  check_float_2d(x, op, "x");
  check_float_2d(w, op, "weight");
  LASS_CHECK(x.size(1) == w.size(1) && x.scalar_type() == w.scalar_type(), op,
              ": x must be ", w.scalar_type(), "[T, K=", w.size(1), "], got ", x.scalar_type(),
              x.sizes());
  const int64_t t_rows = x.size(0), n = w.size(0), k = w.size(1);
  check_cpu(bits_bank, op, "bits_bank");
  LASS_CHECK(bits_bank.dim() == 3, op, ": bits_bank must be int32[P, N, ceil(K/32)], got ",
              bits_bank.sizes());
  const int64_t pairs = bits_bank.size(0);
  check_exact(bits_bank, op, "bits_bank", at::kInt, {pairs, n, num_words(k)});
  check_cpu(seg_offsets, op, "seg_offsets");
  check_cpu(seg_pair, op, "seg_pair");
  const int64_t segs = seg_pair.size(0);
  check_exact(seg_pair, op, "seg_pair", at::kLong, {segs});
  check_exact(seg_offsets, op, "seg_offsets", at::kLong, {segs + 1});
  if (bias.has_value()) check_exact(*bias, op, "bias", w.scalar_type(), {n});
  const int64_t* offs = seg_offsets.data_ptr<int64_t>();
  const int64_t* pid = seg_pair.data_ptr<int64_t>();
  LASS_CHECK(offs[0] == 0 && offs[segs] == t_rows, op, ": seg_offsets must run from 0 to T=",
              t_rows);
  for (int64_t s = 0; s < segs; ++s) {
    LASS_CHECK(offs[s] <= offs[s + 1], op, ": seg_offsets must be non-decreasing");
    LASS_CHECK(pid[s] >= 0 && pid[s] < pairs, op, ": seg_pair ids must be in [0, P=", pairs,
                "), got ", pid[s]);
  }
  auto y = at::empty({t_rows, n}, x.options());
  if (t_rows == 0 || n == 0) return y;
  if (k == 0) {
    if (bias.has_value()) return y.copy_(bias->unsqueeze(0).expand({t_rows, n}));
    return y.zero_();
  }
  if (x.scalar_type() == at::kFloat && has_avx512() && panel_gemm_enabled()) {
    panel_segments(x, w, bits_bank.data_ptr<int32_t>(), n * num_words(k), offs, pid, segs, bias,
                   y);
    return y;
  }
  if (x.scalar_type() == at::kBFloat16 && has_amx_bf16()) {
    segments_amx(x, w, bits_bank.data_ptr<int32_t>(), n * num_words(k), offs, pid, segs, bias,
                 y);
    return y;
  }
  // 4x the usual tile: each segment's GEMM has few rows, so wider tiles mean fewer calls
  tiled_segments(x, w, bits_bank.data_ptr<int32_t>(), n * num_words(k), offs, pid, segs, bias, y,
                 4);
  return y;
}

static at::Tensor segmented_masked_linear_op(const at::Tensor& x, const at::Tensor& w,
                                             const at::Tensor& bits_bank,
                                             const at::Tensor& seg_offsets,
                                             const at::Tensor& seg_pair,
                                             const c10::optional<at::Tensor>& bias) {
  static const auto registry = registry_overload<decltype(segmented_masked_linear_op)>(
      "lass_sparse::segmented_masked_linear");
  return run_or_defer(
      registry,
      [&] {
        return segmented_masked_linear(x.contiguous(), w.contiguous(), bits_bank.contiguous(),
                                       seg_offsets.contiguous(), seg_pair.contiguous(),
                                       contiguous(bias));
      },
      x, w, bits_bank, seg_offsets, seg_pair, bias);
}

}  // namespace lass_sparse_cpu

TORCH_LIBRARY_IMPL(lass_sparse, CPU, m) {
  m.impl("segmented_masked_linear", &lass_sparse_cpu::segmented_masked_linear_op);
}
