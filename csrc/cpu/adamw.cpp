// Fused masked AdamW on the CPU (twin of the CUDA kernel): one pass per parameter. Mask-1
// entries get decoupled weight decay + the bias-corrected Adam step, computed in fp32;
// mask-0 entries keep p, exp_avg and exp_avg_sq bit-for-bit (they are never written).
#include <algorithm>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "common.h"
#include "common/adamw_checks.h"
#include "simd.h"

namespace lass_sparse_cpu {

struct AdamConsts {
  float b1, omb1, b2, omb2, eps, decay, step_size, bc2_sqrt;
  bool maximize;
};

static inline float load(const float* p, int64_t i) { return p[i]; }
static inline float load(const c10::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }

// Elements [lo, lo + cnt) of one run; `word` selects which are updated (all when word = ~0).
template <typename T>
__attribute__((always_inline)) static inline void adam_run(T* p, const T* g, float* m, float* v,
                                                           int64_t lo, int64_t cnt, uint32_t word,
                                                           const AdamConsts& c) {
  for (int64_t j = 0; j < cnt; ++j) {
    if (!((word >> j) & 1u)) continue;
    const int64_t i = lo + j;
    float gi = load(g, i);
    if (c.maximize) gi = -gi;
    const float mn = m[i] * c.b1 + gi * c.omb1;
    const float vn = v[i] * c.b2 + gi * gi * c.omb2;
    const float denom = std::sqrt(vn) / c.bc2_sqrt + c.eps;
    const float pn = load(p, i) * c.decay - c.step_size * mn / denom;
    m[i] = mn;
    v[i] = vn;
    p[i] = static_cast<T>(pn);
  }
}

// AVX-512: 16 lanes per step, the mask word's bits are the lane masks of masked loads and
// stores, so off-mask p, m and v are never written. The same operations in the same order as
// adam_run (separate mul and add, IEEE sqrt and div, round-to-nearest-even to bf16), so both
// paths give identical bits.
__attribute__((target("avx512f,avx512bw"))) static inline __m512 load16(const float* p,
                                                                          __mmask16 k) {
  return _mm512_maskz_loadu_ps(k, p);
}
__attribute__((target("avx512f,avx512bw"))) static inline __m512 load16(const c10::BFloat16* p,
                                                                          __mmask16 k) {
  const __m256i raw = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
__attribute__((target("avx512f,avx512bw"))) static inline void store16(float* p, __mmask16 k,
                                                                         __m512 x) {
  _mm512_mask_storeu_ps(p, k, x);
}
__attribute__((target("avx512f,avx512bw"))) static inline void store16(c10::BFloat16* p,
                                                                         __mmask16 k, __m512 x) {
  const __m512i u = _mm512_castps_si512(x);  // c10's float -> bfloat16: nearest even, NaN 0x7FC0
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r,
                              _mm512_set1_epi32(0x7FC0));
  _mm512_mask_storeu_epi16(p, k, _mm512_castsi256_si512(_mm512_cvtepi32_epi16(r)));
}

// Elements [0, count) of one row; `words`: its mask (nullptr: every element).
template <typename T>
__attribute__((target("avx512f,avx512bw"))) static void adam_row_avx512(
    T* p, const T* g, float* m, float* v, const int32_t* words, int64_t count,
    const AdamConsts& c) {
  const __m512 b1 = _mm512_set1_ps(c.b1), omb1 = _mm512_set1_ps(c.omb1);
  const __m512 b2 = _mm512_set1_ps(c.b2), omb2 = _mm512_set1_ps(c.omb2);
  const __m512 eps = _mm512_set1_ps(c.eps), decay = _mm512_set1_ps(c.decay);
  const __m512 step = _mm512_set1_ps(c.step_size), bc2 = _mm512_set1_ps(c.bc2_sqrt);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t w = 0; w * 32 < count; ++w) {
    const uint32_t word = words ? run_word(words, w, count) : valid_lanes(w, count);
    for (int half = 0; half < 2; ++half) {
      const __mmask16 k = static_cast<__mmask16>(word >> (16 * half));
      if (!k) continue;
      const int64_t i = w * 32 + 16 * half;
      __m512 gi = load16(g + i, k);
      if (c.maximize) gi = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(gi), sign));
      const __m512 mn = _mm512_add_ps(_mm512_mul_ps(load16(m + i, k), b1),
                                      _mm512_mul_ps(gi, omb1));
      const __m512 vn = _mm512_add_ps(_mm512_mul_ps(load16(v + i, k), b2),
                                      _mm512_mul_ps(_mm512_mul_ps(gi, gi), omb2));
      const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vn), bc2), eps);
      const __m512 pn = _mm512_sub_ps(_mm512_mul_ps(load16(p + i, k), decay),
                                      _mm512_div_ps(_mm512_mul_ps(step, mn), denom));
      store16(m + i, k, mn);
      store16(v + i, k, vn);
      store16(p + i, k, pn);
    }
  }
}

// One row (or run) of `count` elements; `words`: its mask (nullptr: every element).
template <typename T>
static void adam_row(T* p, const T* g, float* m, float* v, const int32_t* words, int64_t count,
                     const AdamConsts& c) {
  if (has_avx512()) return adam_row_avx512(p, g, m, v, words, count, c);
  for (int64_t w = 0; w * 32 < count; ++w) {
    const uint32_t word = words ? run_word(words, w, count) : valid_lanes(w, count);
    if (word) adam_run(p, g, m, v, w * 32, std::min<int64_t>(32, count - w * 32), word, c);
  }
}

template <typename T>
static void adam_param(T* p, const T* g, float* m, float* v, const int32_t* bits, int64_t numel,
                       int64_t k, const AdamConsts& c) {
  if (!bits) {
    at::parallel_for(0, numel, 1 << 14, [&](int64_t lo, int64_t hi) {
      adam_row(p + lo, g + lo, m + lo, v + lo, nullptr, hi - lo, c);
    });
    return;
  }
  const int64_t rows = k ? numel / k : 0, nw = num_words(k);
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(k, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r)
                       adam_row(p + r * k, g + r * k, m + r * k, v + r * k, bits + r * nw, k, c);
                   });
}

void masked_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& bits,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   int64_t step, bool maximize) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const size_t n = params.size();
  check_adamw_lists_and_hparams(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps,
                                weight_decay, step);
  const char* op = "masked_adamw_";
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const std::string idx = "[" + std::to_string(i) + "]";
    check_cpu(p, op, ("params" + idx).c_str());
    LASS_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16,
                "masked_adamw_ (cpu): params", idx, " must be float32 or bfloat16, got ",
                p.scalar_type());
    LASS_CHECK(p.is_contiguous(), op, ": params", idx, " must be contiguous");
    check_exact(g, op, ("grads" + idx).c_str(), p.scalar_type(), p.sizes());
    check_exact(exp_avgs[i], op, ("exp_avgs" + idx).c_str(), at::kFloat, p.sizes());
    check_exact(exp_avg_sqs[i], op, ("exp_avg_sqs" + idx).c_str(), at::kFloat, p.sizes());
    const std::optional<at::Tensor> b = bits.get(i);
    if (b.has_value()) {
      LASS_CHECK(p.dim() >= 1, op, ": a masked param must have >= 1 dim, params", idx,
                  " is 0-d");
      check_bits(*b, p.sizes().slice(0, p.dim() - 1), p.size(-1), op, ("bits" + idx).c_str());
    }
  }
  check_adamw_no_overlap(params, grads, exp_avgs, exp_avg_sqs);
  // Every list entry is checked before the first one is updated: no half-applied step.
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamConsts c{static_cast<float>(beta1), static_cast<float>(1.0 - beta1),
               static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
               static_cast<float>(eps),   static_cast<float>(1.0 - lr * weight_decay),
               static_cast<float>(lr / bc1), static_cast<float>(std::sqrt(bc2)), maximize};
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const std::optional<at::Tensor> b = bits.get(i);
    const int32_t* bp = b.has_value() ? b->data_ptr<int32_t>() : nullptr;
    const int64_t k = p.dim() ? p.size(-1) : 1;
    float* m = exp_avgs[i].data_ptr<float>();
    float* v = exp_avg_sqs[i].data_ptr<float>();
    if (p.scalar_type() == at::kFloat)
      adam_param(p.data_ptr<float>(), g.data_ptr<float>(), m, v, bp, p.numel(), k, c);
    else if (p.scalar_type() == at::kBFloat16)
      adam_param(p.data_ptr<c10::BFloat16>(), g.data_ptr<c10::BFloat16>(), m, v, bp, p.numel(),
                 k, c);
  }
}

}  // namespace lass_sparse_cpu

TORCH_LIBRARY_IMPL(lass_sparse, CPU, m) {
  m.impl("masked_adamw_", &lass_sparse_entry::adamw_entry<&lass_sparse_cpu::masked_adamw_>);
}
