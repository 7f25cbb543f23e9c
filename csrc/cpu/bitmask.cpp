// Pack / unpack of the DESIGN §2 format on the CPU.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstring>

#include "common.h"

namespace lass_sparse_cpu {

// 8 bool bytes (0/1) -> 8 bits, byte i -> bit i: the multiplier places byte i's bit at 56 + i and
// every cross term at a distinct lower bit, so nothing carries into the top byte.
static inline uint32_t gather8(const bool* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return static_cast<uint32_t>((v * 0x0102040810204080ULL) >> 56);
}

// 8 bits -> 8 bool bytes (bit i -> byte i): replicate, keep bit i in byte i, normalise to 0/1.
static inline void spread8(uint32_t byte, bool* p) {
  uint64_t v = (static_cast<uint64_t>(byte) * 0x0101010101010101ULL) & 0x8040201008040201ULL;
  v = ((v + 0x7F7F7F7F7F7F7F7FULL) >> 7) & 0x0101010101010101ULL;
  std::memcpy(p, &v, 8);
}

at::Tensor pack_mask(const at::Tensor& mask) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_cpu(mask, "pack_mask", "mask");
  LASS_CHECK(mask.scalar_type() == at::kBool && mask.dim() >= 1,
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
        if (n == 32) {
          word = gather8(row + lo) | gather8(row + lo + 8) << 8 | gather8(row + lo + 16) << 16 |
                 gather8(row + lo + 24) << 24;
        } else {
          for (int64_t j = 0; j < n; ++j) word |= uint32_t(row[lo + j]) << j;
        }
        dst[r * w + wi] = static_cast<int32_t>(word);
      }
    }
  });
  return out;
}

at::Tensor unpack_mask(const at::Tensor& bits, int64_t k) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_cpu(bits, "unpack_mask", "bits");
  LASS_CHECK(k >= 0, "unpack_mask: k must be >= 0, got ", k);
  LASS_CHECK(bits.scalar_type() == at::kInt && bits.dim() >= 1 && bits.size(-1) == num_words(k),
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
    for (int64_t r = r0; r < r1; ++r) {
      bool* row = dst + r * k;
      const int32_t* words = src + r * w;
      int64_t j = 0;
      for (; j + 32 <= k; j += 32) {
        const uint32_t word = static_cast<uint32_t>(words[j >> 5]);
        for (int b = 0; b < 4; ++b) spread8((word >> (8 * b)) & 0xFFu, row + j + 8 * b);
      }
      for (; j < k; ++j) row[j] = (static_cast<uint32_t>(words[j >> 5]) >> (j & 31)) & 1u;
    }
  });
  return out;
}

}  // namespace lass_sparse_cpu

namespace lass_sparse_cpu {
static at::Tensor pack_mask_op(const at::Tensor& mask) {
  static const auto registry = registry_overload<decltype(pack_mask_op)>("lass_sparse::pack_mask");
  return run_or_defer(registry, [&] { return pack_mask(mask.contiguous()); }, mask);
}

static at::Tensor unpack_mask_op(const at::Tensor& bits, int64_t k) {
  static const auto registry =
      registry_overload<decltype(unpack_mask_op)>("lass_sparse::unpack_mask");
  return run_or_defer(registry, [&] { return unpack_mask(bits.contiguous(), k); }, bits, k);
}
}  // namespace lass_sparse_cpu

TORCH_LIBRARY_IMPL(lass_sparse, CPU, m) {
  m.impl("pack_mask", &lass_sparse_cpu::pack_mask_op);
  m.impl("unpack_mask", &lass_sparse_cpu::unpack_mask_op);
}
