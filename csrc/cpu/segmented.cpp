// segmented_masked_linear on the CPU: rows grouped by pair, one pass over W's row tiles for
// every segment (panel_fp32.cpp for fp32 with AVX-512, amx_bf16.cpp for bf16 with AMX, else
// tiled.cpp); its entry under the public name.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linear.h"

namespace lass_sparse_cpu {

namespace {
// The segment table of a call on T rows and a bank of P pairs (int64, contiguous, CPU):
// offsets from 0 to T, non-decreasing, pairs in [0, P). Returns the number of segments.
int64_t check_table(const at::Tensor& seg_offsets, const at::Tensor& seg_pair, int64_t t_rows,
                    int64_t pairs, const char* op) {
  check_cpu(seg_offsets, op, "seg_offsets");
  check_cpu(seg_pair, op, "seg_pair");
  LASS_CHECK(seg_pair.dim() == 1, op, ": seg_pair must be int64[S], got ", seg_pair.sizes());
  const int64_t segs = seg_pair.size(0);
  check_exact(seg_pair, op, "seg_pair", at::kLong, {segs});
  check_exact(seg_offsets, op, "seg_offsets", at::kLong, {segs + 1});
  const int64_t* offs = seg_offsets.data_ptr<int64_t>();
  const int64_t* pid = seg_pair.data_ptr<int64_t>();
  LASS_CHECK(offs[0] == 0 && offs[segs] == t_rows, op, ": seg_offsets must run from 0 to T=",
              t_rows);
  for (int64_t s = 0; s < segs; ++s) {
    LASS_CHECK(offs[s] <= offs[s + 1], op, ": seg_offsets must be non-decreasing");
    LASS_CHECK(pid[s] >= 0 && pid[s] < pairs, op, ": seg_pair ids must be in [0, P=", pairs,
                "), got ", pid[s]);
  }
  return segs;
}

// bits_bank int32[P, N, ceil(K/32)] (contiguous, CPU); returns P.
int64_t check_bank(const at::Tensor& bits_bank, int64_t n, int64_t k, const char* op) {
  check_cpu(bits_bank, op, "bits_bank");
  LASS_CHECK(bits_bank.dim() == 3, op, ": bits_bank must be int32[P, N, ceil(K/32)], got ",
              bits_bank.sizes());
  const int64_t pairs = bits_bank.size(0);
  check_exact(bits_bank, op, "bits_bank", at::kInt, {pairs, n, num_words(k)});
  return pairs;
}
}  // namespace

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
  const int64_t pairs = check_bank(bits_bank, n, k, op);
  const int64_t segs = check_table(seg_offsets, seg_pair, t_rows, pairs, op);
  if (bias.has_value()) check_exact(*bias, op, "bias", w.scalar_type(), {n});
  const int64_t* offs = seg_offsets.data_ptr<int64_t>();
  const int64_t* pid = seg_pair.data_ptr<int64_t>();
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

// Its backward. dx: segment s's rows = grad_out's (W ⊙ M_pid[s]), per segment (the
// masked_linear kernels; a fused pass over W for every segment measured no faster on AMX: the
// packing under each pair's mask dominates). dW = Σ_s (grad_out_sᵀ x_s) ⊙ M_pid[s] in x's dtype:
// bf16 on AMX tiles in one pass over dW's blocks for every segment (0.58-0.74x the time of the
// per-segment sum, 2-16 pairs); else one segment: the masked_linear kernel; several: each one
// added under its mask into an fp32 (fp64) sum.
at::Tensor segmented_masked_linear_dx(const at::Tensor& dy, const at::Tensor& w,
                                      const at::Tensor& bits_bank, const at::Tensor& seg_offsets,
                                      const at::Tensor& seg_pair) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "segmented_masked_linear_dx";
  check_float_2d(dy, op, "grad_out");
  check_float_2d(w, op, "weight");
  LASS_CHECK(dy.size(1) == w.size(0) && dy.scalar_type() == w.scalar_type(), op,
              ": grad_out must be ", w.scalar_type(), "[T, N=", w.size(0), "], got ",
              dy.scalar_type(), dy.sizes());
  const int64_t t_rows = dy.size(0), n = w.size(0), k = w.size(1);
  const int64_t pairs = check_bank(bits_bank, n, k, op);
  const int64_t segs = check_table(seg_offsets, seg_pair, t_rows, pairs, op);
  const int64_t* offs = seg_offsets.data_ptr<int64_t>();
  const int64_t* pid = seg_pair.data_ptr<int64_t>();
  auto dx = at::empty({t_rows, k}, dy.options());
  if (t_rows == 0 || k == 0) return dx;
  if (n == 0) return dx.zero_();
  for (int64_t s = 0; s < segs; ++s) {
    const int64_t lo = offs[s], len = offs[s + 1] - lo;
    if (len == 0) continue;
    if (len == t_rows) return masked_linear_dx(dy, w, bits_bank[pid[s]]);
    dx.narrow(0, lo, len).copy_(masked_linear_dx(dy.narrow(0, lo, len), w, bits_bank[pid[s]]));
  }
  return dx;
}

at::Tensor segmented_masked_linear_dw(const at::Tensor& dy, const at::Tensor& x,
                                      const at::Tensor& bits_bank, const at::Tensor& seg_offsets,
                                      const at::Tensor& seg_pair) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "segmented_masked_linear_dw";
  check_float_2d(dy, op, "grad_out");
  check_float_2d(x, op, "x");
  LASS_CHECK(dy.size(0) == x.size(0) && dy.scalar_type() == x.scalar_type(), op,
              ": grad_out [T, N] and x [T, K] must share T and dtype, got ", dy.scalar_type(),
              dy.sizes(), " and ", x.scalar_type(), x.sizes());
  const int64_t t_rows = x.size(0), n = dy.size(1), k = x.size(1);
  const int64_t pairs = check_bank(bits_bank, n, k, op);
  const int64_t segs = check_table(seg_offsets, seg_pair, t_rows, pairs, op);
  const int64_t* offs = seg_offsets.data_ptr<int64_t>();
  const int64_t* pid = seg_pair.data_ptr<int64_t>();
  if (n == 0 || k == 0 || t_rows == 0) return at::zeros({n, k}, x.options());
  if (x.scalar_type() == at::kBFloat16 && has_amx_bf16()) {
    auto dw = at::empty({n, k}, x.options());
    segments_dw_amx(dy, x, bits_bank.data_ptr<int32_t>(), n * num_words(k), offs, pid, segs, dw);
    return dw;
  }
  int64_t nonempty = 0;
  for (int64_t s = 0; s < segs; ++s) nonempty += offs[s + 1] > offs[s];
  // several segments: each one's masked dyᵀx added into one fp32 (fp64) sum
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sum;
  for (int64_t s = 0; s < segs; ++s) {
    const int64_t lo = offs[s], len = offs[s + 1] - lo;
    if (len == 0) continue;
    const auto d = dy.narrow(0, lo, len), xs = x.narrow(0, lo, len);
    if (nonempty == 1) return masked_linear_dw(d, xs, bits_bank[pid[s]]);  // in x's dtype
    if (!sum.defined()) sum = at::zeros({n, k}, x.options().dtype(acc_type));
    masked_linear_dw_accumulate_(sum, d, xs, bits_bank[pid[s]]);
  }
  return sum.to(x.scalar_type());
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

static at::Tensor segmented_dx_op(const at::Tensor& dy, const at::Tensor& w,
                                  const at::Tensor& bits_bank, const at::Tensor& seg_offsets,
                                  const at::Tensor& seg_pair) {
  static const auto registry = registry_overload<decltype(segmented_dx_op)>(
      "lass_sparse::segmented_masked_linear_dx");
  return run_or_defer(
      registry,
      [&] {
        return segmented_masked_linear_dx(dy.contiguous(), w.contiguous(), bits_bank.contiguous(),
                                          seg_offsets.contiguous(), seg_pair.contiguous());
      },
      dy, w, bits_bank, seg_offsets, seg_pair);
}

static at::Tensor segmented_dw_op(const at::Tensor& dy, const at::Tensor& x,
                                  const at::Tensor& bits_bank, const at::Tensor& seg_offsets,
                                  const at::Tensor& seg_pair) {
  static const auto registry = registry_overload<decltype(segmented_dw_op)>(
      "lass_sparse::segmented_masked_linear_dw");
  return run_or_defer(
      registry,
      [&] {
        return segmented_masked_linear_dw(dy.contiguous(), x.contiguous(), bits_bank.contiguous(),
                                          seg_offsets.contiguous(), seg_pair.contiguous());
      },
      dy, x, bits_bank, seg_offsets, seg_pair);
}
}  // namespace lass_sparse_cpu

TORCH_LIBRARY_IMPL(lass_sparse, CPU, m) {
  m.impl("segmented_masked_linear", &lass_sparse_cpu::segmented_masked_linear_op);
  m.impl("segmented_masked_linear_dx", &lass_sparse_cpu::segmented_dx_op);
  m.impl("segmented_masked_linear_dw", &lass_sparse_cpu::segmented_dw_op);
}
