// masked_cast on the CPU: out = (W ⊙ M).to(dtype) in one pass (a select: NaN/Inf off the mask
// never passes). What MaskedLinear runs under autocast in place of autocast's own cast of W.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "simd.h"

namespace lass_sparse_cpu {

namespace {

// One row: out[j] = bit j of the row's words ? src[j] (converted) : 0.
template <typename In, typename Out>
void cast_row_generic(const In* src, const int32_t* words, Out* out, int64_t k) {
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

// AVX-512: each mask word is two 16-lane masks for masked (zeroing) loads, lanes past the row
// are never read (run_word) or written (valid_lanes); conversions as torch's: fp32 -> bf16
// rounded to nearest even in integer ops (NaN -> 0x7FC0, c10::BFloat16's rule), fp32 -> fp16
// by vcvtps2ph (nearest even), widening exactly.
using BF16 = c10::BFloat16;

__attribute__((target("avx512f,avx512bw"))) inline __m256i bf16_rne(__m512 a) {
  const __m512i u = _mm512_castps_si512(a);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q),
                            _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// fp32 -> 16-bit (Out: BF16 or at::Half).
template <typename Out>
__attribute__((target("avx512f,avx512bw"))) void narrow_row_avx512(
    const float* src, const int32_t* words, Out* out, int64_t k) {
  for (int64_t w = 0; w < num_words(k); ++w) {
    const uint32_t word = run_word(words, w, k), valid = valid_lanes(w, k);
    __m256i half[2];
    for (int h = 0; h < 2; ++h) {
      const __m512 a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(word >> (16 * h)),
                                             src + w * 32 + 16 * h);
      if constexpr (std::is_same_v<Out, BF16>)
        half[h] = bf16_rne(a);
      else
        half[h] = _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(half[0]), half[1], 1);
    _mm512_mask_storeu_epi16(out + w * 32, static_cast<__mmask32>(valid), v);
  }
}

// 16-bit (In: BF16 or at::Half) -> fp32, exact.
template <typename In>
__attribute__((target("avx512f,avx512bw"))) void widen_row_avx512(
    const In* src, const int32_t* words, float* out, int64_t k) {
  for (int64_t w = 0; w < num_words(k); ++w) {
    const uint32_t word = run_word(words, w, k), valid = valid_lanes(w, k);
    const __m512i v = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(word), src + w * 32);
    for (int h = 0; h < 2; ++h) {
      const __m256i part = h ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
      __m512 f;
      if constexpr (std::is_same_v<In, BF16>)
        f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(part), 16));
      else
        f = _mm512_cvtph_ps(part);
      _mm512_mask_storeu_ps(out + w * 32 + 16 * h, static_cast<__mmask16>(valid >> (16 * h)), f);
    }
  }
}

template <typename T>
constexpr bool is16 = std::is_same_v<T, BF16> || std::is_same_v<T, at::Half>;

template <typename In, typename Out>
void cast_row(const In* src, const int32_t* words, Out* out, int64_t k) {
  if (has_avx512()) {
    if constexpr (std::is_same_v<In, Out> && (std::is_same_v<In, float> || is16<In>)) {
      using Raw = std::conditional_t<std::is_same_v<In, float>, float, BF16>;  // lanes moved
      return masked_copy_avx512(reinterpret_cast<const Raw*>(src), words, k,
                                reinterpret_cast<Raw*>(out));
    } else if constexpr (std::is_same_v<In, float> && is16<Out>) {
      return narrow_row_avx512<Out>(src, words, out, k);
    } else if constexpr (is16<In> && std::is_same_v<Out, float>) {
      return widen_row_avx512<In>(src, words, out, k);
    }
  }
  cast_row_generic<In, Out>(src, words, out, k);
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
