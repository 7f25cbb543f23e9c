// masked_cast on the CPU: out = (W ⊙ M).to(dtype) in one pass (a select: NaN/Inf off the mask
// never passes). What MaskedLinear runs under autocast in place of autocast's own cast of W.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace lass_sparse_cpu {

namespace {

// One row: out[j] = bit j of the row's words ? src[j] (converted) : 0.
template <typename In, typename Out>
void cast_row(const In* src, const int32_t* words, Out* out, int64_t k) {
  using Acc = std::conditional_t<std::is_same_v<In, double>, double, float>;
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {
    const uint32_t word = static_cast<uint32_t>(words[j >> 5]);
    for (int b = 0; b < 32; ++b)
      out[j + b] = ((word >> b) & 1u) ? static_cast<Out>(static_cast<Acc>(src[j + b]))
                                      : static_cast<Out>(0);
  }
  for (; j < k; ++j)
    out[j] = ((static_cast<uint32_t>(words[j >> 5]) >> (j & 31)) & 1u)
                 ? static_cast<Out>(static_cast<Acc>(src[j]))
                 : static_cast<Out>(0);
}

bool cast_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf;
}

}  // namespace

at::Tensor masked_cast(const at::Tensor& weight, const at::Tensor& bits, at::ScalarType dtype) {
  const char* op = "masked_cast";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_cpu(weight, op, "weight");
  LASS_CHECK(weight.dim() >= 1 && cast_dtype(weight.scalar_type()), op,
             ": weight must be float32, float64, bfloat16 or float16 [..., K], got ",
             weight.scalar_type(), weight.sizes());
  LASS_CHECK(cast_dtype(dtype), op,
             ": dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  const auto w = weight.contiguous();
  const int64_t k = w.size(-1);
  const auto rows = w.sizes().slice(0, w.dim() - 1);
  const auto b = bits.contiguous();
  check_bits(b, rows, k, op);
  auto out = at::empty(w.sizes(), w.options().dtype(dtype));
  const int64_t n = k ? w.numel() / k : 0, nw = num_words(k);
  if (out.numel() == 0) return out;
  const int32_t* words = b.data_ptr<int32_t>();
  const auto in_type = w.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in_type, "masked_cast", [&] {
    using In = scalar_t;
    const In* src = w.data_ptr<In>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "masked_cast", [&] {
      scalar_t* dst = out.data_ptr<scalar_t>();
      // rows of >= 16K weights a task: a pass over W is memory-bound
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
      at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          cast_row<In, scalar_t>(src + r * k, words + r * nw, dst + r * k, k);
      });
    });
  });
  return out;
}

}  // namespace lass_sparse_cpu

namespace lass_sparse_cpu {
static at::Tensor masked_cast_op(const at::Tensor& weight, const at::Tensor& bits,
                                 at::ScalarType dtype) {
  static const auto registry =
      registry_overload<decltype(masked_cast_op)>("lass_sparse::masked_cast");
  return run_or_defer(registry, [&] { return masked_cast(weight, bits, dtype); }, weight, bits,
                      dtype);
}
}  // namespace lass_sparse_cpu

TORCH_LIBRARY_IMPL(lass_sparse, CPU, m) {
  m.impl("masked_cast", &lass_sparse_cpu::masked_cast_op);
}
