// Pack / unpack of the DESIGN §2 format on the CPU.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "common.h"

namespace lass_sparse_cpu {

at::Tensor pack_mask(const at::Tensor& mask) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() >= 1,
              "pack_mask: mask must be bool[..., K], got ", mask.scalar_type(), mask.sizes());
  auto m = mask.contiguous();
  const int64_t k = m.size(-1), rows = k ? m.numel() / k : 0, w = num_words(k);
  auto sizes = m.sizes().vec();
  sizes.back() = w;
  auto out = at::empty(sizes, m.options().dtype(at::kInt));
  const bool* src = m.data_ptr<bool>();
  int32_t* dst = out.data_ptr<int32_t>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bool* row = src + r * k;
      for (int64_t wi = 0; wi < w; ++wi) {
        uint32_t word = 0;
        const int64_t lo = wi * 32, n = std::min<int64_t>(32, k - lo);
        for (int64_t j = 0; j < n; ++j) word |= uint32_t(row[lo + j]) << j;
        dst[r * w + wi] = static_cast<int32_t>(word);
      }
    }
  });
  return out;
}

at::Tensor unpack_mask(const at::Tensor& bits, int64_t k) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.dim() >= 1 && bits.size(-1) == num_words(k),
              "unpack_mask: bits must be int32[..., ceil(k/32)] for k=", k, ", got ",
              bits.scalar_type(), bits.sizes());
  auto b = bits.contiguous();
  const int64_t w = b.size(-1), rows = w ? b.numel() / w : 0;
  auto sizes = b.sizes().vec();
  sizes.back() = k;
  auto out = at::empty(sizes, b.options().dtype(at::kBool));
  const int32_t* src = b.data_ptr<int32_t>();
  bool* dst = out.data_ptr<bool>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < k; ++j)
        dst[r * k + j] = (static_cast<uint32_t>(src[r * w + (j >> 5)]) >> (j & 31)) & 1u;
  });
  return out;
}

}  // namespace lass_sparse_cpu

TORCH_LIBRARY_IMPL(lass_sparse_cpu, CPU, m) {
  m.impl("pack_mask", &lass_sparse_cpu::pack_mask);
  m.impl("unpack_mask", &lass_sparse_cpu::unpack_mask);
}
