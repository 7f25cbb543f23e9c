// LaSS magnitude mask on the CPU: keep |w| > kthvalue(|w|.flatten(), int(alpha * numel)),
// fused compare + pack. int(alpha * numel) == 0 keeps every entry.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace lass_sparse_cpu {

at::Tensor magnitude_mask(const at::Tensor& weight, double alpha) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_cpu(weight, "magnitude_mask", "weight");
  LASS_CHECK(weight.dim() >= 1 && at::isFloatingType(weight.scalar_type()),
              "magnitude_mask: weight must be a floating tensor with >= 1 dim");
  LASS_CHECK(alpha >= 0.0 && alpha < 1.0, "magnitude_mask: alpha must be in [0, 1), got ", alpha);
  auto w = weight.contiguous();
  const int64_t k = w.size(-1), rows = k ? w.numel() / k : 0, nw = num_words(k);
  auto sizes = w.sizes().vec();
  sizes.back() = nw;
  auto out = at::empty(sizes, w.options().dtype(at::kInt));
  const int64_t kth = static_cast<int64_t>(alpha * static_cast<double>(w.numel()));
  // Compare in fp32 for half types (widening keeps order and ties), else in the weight dtype.
  auto a = w.abs();
  if (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf) a = a.to(at::kFloat);
  const bool keep_all = kth == 0;
  const double thr = keep_all ? 0.0 : std::get<0>(at::kthvalue(a.flatten(), kth)).item<double>();
  int32_t* dst = out.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "magnitude_mask", [&] {
    const scalar_t* src = a.data_ptr<scalar_t>();
    const scalar_t t = static_cast<scalar_t>(thr);  // exact: thr is one of the values
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = src + r * k;
        for (int64_t wi = 0; wi < nw; ++wi) {
          const int64_t lo = wi * 32, cnt = std::min<int64_t>(32, k - lo);
          uint32_t word = 0;
          for (int64_t j = 0; j < cnt; ++j)
            word |= uint32_t(keep_all || row[lo + j] > t) << j;
          dst[r * nw + wi] = static_cast<int32_t>(word);
        }
      }
    });
  });
  return out;
}

}  // namespace lass_sparse_cpu

namespace lass_sparse_cpu {
static at::Tensor magnitude_mask_op(const at::Tensor& weight, double alpha) {
  static const auto registry =
      registry_overload<decltype(magnitude_mask_op)>("lass_sparse::magnitude_mask");
  return run_or_defer(
      registry, [&] { return magnitude_mask(weight.contiguous(), alpha); }, weight, alpha);
}
}  // namespace lass_sparse_cpu

TORCH_LIBRARY_IMPL(lass_sparse, CPU, m) {
  m.impl("magnitude_mask", &lass_sparse_cpu::magnitude_mask_op);
}
