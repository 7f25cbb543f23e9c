// Forward at few rows (M <= kGemvMaxRows, decode): the mask bits are decoded inside the inner
// loop (AVX-512 masked loads: a mask word is the lane mask), parallel over output rows; no
// decoded copy of W. fp32 and bf16 with AVX-512 (bf16 with AVX512-BF16 dot products where the
// CPU has them), float64 and machines without AVX-512: portable loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "linear.h"

namespace lass_sparse_cpu {

template <typename T, typename Acc>
static void gemv_generic(const T* x, int64_t m_rows, int64_t k, const T* w, const int32_t* bits,
                         const T* bias, T* y, int64_t n, int64_t n0, int64_t n1) {
  const int64_t nw = num_words(k);
  Acc acc[kGemvMaxRows][32];
  for (int64_t r = n0; r < n1; ++r) {
    for (int64_t m = 0; m < m_rows; ++m)
      for (int j = 0; j < 32; ++j) acc[m][j] = Acc(0);
    const T* wr = w + r * k;
    for (int64_t wi = 0; wi < nw; ++wi) {
      const uint32_t word = run_word(bits + r * nw, wi, k);
      const int64_t lo = wi * 32, cnt = std::min<int64_t>(32, k - lo);
      Acc wm[32];
      for (int64_t j = 0; j < cnt; ++j)
        wm[j] = ((word >> j) & 1u) ? static_cast<Acc>(wr[lo + j]) : Acc(0);
      for (int64_t m = 0; m < m_rows; ++m) {
        const T* xr = x + m * k + lo;
        for (int64_t j = 0; j < cnt; ++j) acc[m][j] += static_cast<Acc>(xr[j]) * wm[j];
      }
    }
    for (int64_t m = 0; m < m_rows; ++m) {
      Acc s = bias ? static_cast<Acc>(bias[r]) : Acc(0);
      for (int j = 0; j < 32; ++j) s += acc[m][j];
      y[m * n + r] = static_cast<T>(s);
    }
  }
}

__attribute__((target("avx512f,avx512bw"))) static inline __m512 bf16x16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// One mask word's 32 weights as two fp32 vectors, pruned lanes zeroed. `full` = all 32 valid.
template <typename T, bool full>
__attribute__((target("avx512f,avx512bw"))) static inline void load_word(
    const T* src, uint32_t word, uint32_t valid, __m512& a, __m512& b) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (full) {
      a = _mm512_maskz_mov_ps(static_cast<__mmask16>(word), _mm512_loadu_ps(src));
      b = _mm512_maskz_mov_ps(static_cast<__mmask16>(word >> 16), _mm512_loadu_ps(src + 16));
    } else {
      a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(word & valid), src);
      b = _mm512_maskz_loadu_ps(static_cast<__mmask16>((word & valid) >> 16), src + 16);
    }
  } else {
    __m512i v = full ? _mm512_maskz_mov_epi16(static_cast<__mmask32>(word), _mm512_loadu_si512(src))
                     : _mm512_maskz_loadu_epi16(static_cast<__mmask32>(word & valid), src);
    a = bf16x16_to_f32(_mm512_castsi512_si256(v));
    b = bf16x16_to_f32(_mm512_extracti64x4_epi64(v, 1));
  }
}

// R rows of W (fp32 or bf16) against MB rows of fp32 x; each mask word is a lane mask.
// R > 1 keeps several weight streams in flight (decode is bandwidth-bound at small M).
template <typename T, int R, int MB>
__attribute__((target("avx512f,avx512bw"))) static void gemv_block_avx512(
    const float* x, int64_t k, const T* wr, const int32_t* wbits, float* out) {
  __m512 acc[R][MB][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
  const int64_t full_words = k / 32, nw = num_words(k);
  for (int64_t wi = 0; wi < full_words; ++wi) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512 wa, wb;
      load_word<T, true>(wr + r * k + wi * 32, static_cast<uint32_t>(wbits[r * nw + wi]), 0u,
                         wa, wb);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const float* xr = x + m * k + wi * 32;
        acc[r][m][0] = _mm512_fmadd_ps(wa, _mm512_loadu_ps(xr), acc[r][m][0]);
        acc[r][m][1] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(xr + 16), acc[r][m][1]);
      }
    }
  }
  if (full_words < nw) {  // tail word: K % 32 valid lanes
    const int64_t wi = full_words;
    const uint32_t valid = valid_lanes(wi, k);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512 wa, wb;
      load_word<T, false>(wr + r * k + wi * 32, static_cast<uint32_t>(wbits[r * nw + wi]),
                          valid, wa, wb);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const float* xr = x + m * k + wi * 32;
        __m512 xa = _mm512_maskz_loadu_ps(static_cast<__mmask16>(valid), xr);
        __m512 xb = _mm512_maskz_loadu_ps(static_cast<__mmask16>(valid >> 16), xr + 16);
        acc[r][m][0] = _mm512_fmadd_ps(wa, xa, acc[r][m][0]);
        acc[r][m][1] = _mm512_fmadd_ps(wb, xb, acc[r][m][1]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
      out[r * MB + m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]));
}

template <typename T, int R, int MB>
static inline void gemv_tile(const float* x, int64_t k, const T* w, const int32_t* bits,
                             int64_t nw, const T* bias, T* y, int64_t n, int64_t r0, int64_t m0) {
  float out[R * MB];
  gemv_block_avx512<T, R, MB>(x + m0 * k, k, w + r0 * k, bits + r0 * nw, out);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const float b = bias ? static_cast<float>(bias[r0 + r]) : 0.f;
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) y[(m0 + m) * n + r0 + r] = static_cast<T>(out[r * MB + m] + b);
  }
}

template <typename T>
static void gemv_avx512(const float* x, int64_t m_rows, int64_t k, const T* w,
                        const int32_t* bits, const T* bias, T* y, int64_t n, int64_t n0,
                        int64_t n1) {
  const int64_t nw = num_words(k);
  int64_t r = n0;
  if (m_rows < 4) {  // bandwidth-bound: 4 weight rows at a time, every row of x per pass
    for (; r + 4 <= n1; r += 4) {  // (one pass per x row read W 2-3 times at M = 2-3)
      if (m_rows == 1) gemv_tile<T, 4, 1>(x, k, w, bits, nw, bias, y, n, r, 0);
      else if (m_rows == 2) gemv_tile<T, 4, 2>(x, k, w, bits, nw, bias, y, n, r, 0);
      else gemv_tile<T, 4, 3>(x, k, w, bits, nw, bias, y, n, r, 0);
    }
  }
  for (; r < n1; ++r) {
    int64_t m = 0;
    for (; m + 8 <= m_rows; m += 8) gemv_tile<T, 1, 8>(x, k, w, bits, nw, bias, y, n, r, m);
    for (; m + 4 <= m_rows; m += 4) gemv_tile<T, 1, 4>(x, k, w, bits, nw, bias, y, n, r, m);
    for (; m < m_rows; ++m) gemv_tile<T, 1, 1>(x, k, w, bits, nw, bias, y, n, r, m);
  }
}

// bf16 x bf16 with AVX512-BF16: one dot-product instruction per mask word and x row
// (32 products, fp32 accumulation); the mask word zeroes the pruned weights on load.
template <int R, int MB>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void gemv_block_bf16dp(
    const c10::BFloat16* x, int64_t k, const c10::BFloat16* wr, const int32_t* wbits,
    float* out) {
  __m512 acc[R][MB];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t nw = num_words(k);
  for (int64_t wi = 0; wi < nw; ++wi) {
    const uint32_t valid = valid_lanes(wi, k);
    __m512i xv[MB];
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
      xv[m] = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(valid), x + m * k + wi * 32);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const uint32_t word = static_cast<uint32_t>(wbits[r * nw + wi]) & valid;
      __m512i wv = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(word), wr + r * k + wi * 32);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv, (__m512bh)xv[m]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) out[r * MB + m] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int R, int MB>
static inline void gemv_tile_bf16dp(const c10::BFloat16* x, int64_t k, const c10::BFloat16* w,
                                    const int32_t* bits, int64_t nw, const c10::BFloat16* bias,
                                    c10::BFloat16* y, int64_t n, int64_t r0, int64_t m0) {
  float out[R * MB];
  gemv_block_bf16dp<R, MB>(x + m0 * k, k, w + r0 * k, bits + r0 * nw, out);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const float b = bias ? static_cast<float>(bias[r0 + r]) : 0.f;
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
      y[(m0 + m) * n + r0 + r] = static_cast<c10::BFloat16>(out[r * MB + m] + b);
  }
}

// Words [w0, w1) of R weight rows against MB x rows, accumulating into acc[r * stride + m]
// (the first chunk, w0 = 0, starts from zero instead).
// K is walked in chunks so the W rows and all x rows of a chunk stay in L1 while every x block
// reuses them; accumulators live in registers within a chunk.
template <int R, int MB>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static inline void bf16dp_chunk(
    const c10::BFloat16* x, int64_t k, const c10::BFloat16* wr, const int32_t* wbits,
    int64_t nw, int64_t w0, int64_t w1, __m512* acc, int64_t stride) {
  __m512 a[R][MB];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) a[r][m] = w0 == 0 ? _mm512_setzero_ps() : acc[r * stride + m];
  for (int64_t wi = w0; wi < w1; ++wi) {
    const uint32_t valid = valid_lanes(wi, k);
    __m512i wv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      wv[r] = _mm512_maskz_loadu_epi16(
          static_cast<__mmask32>(static_cast<uint32_t>(wbits[r * nw + wi]) & valid),
          wr + r * k + wi * 32);
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const __m512i xv =
          _mm512_maskz_loadu_epi16(static_cast<__mmask32>(valid), x + m * k + wi * 32);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        a[r][m] = _mm512_dpbf16_ps(a[r][m], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[r * stride + m] = a[r][m];
}

// Lane j = the sum of v[j]'s 16 lanes, for 16 vectors: a tree of 15 adds (one horizontal sum
// per vector cost about 8 instructions each, 25-50% of the dot products at K = 512-1024).
__attribute__((target("avx512f"))) static inline __m512 sum16(const __m512* v) {
  // the tree leaves lane 4L + q with the sum of its input L + 4q: feed it v in that order
  static constexpr int kOrder[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  __m512 t[8], u[4], w[2];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {  // 256-bit halves: lanes 0-7 of input 2j, 8-15 of 2j + 1
    const __m512 a = v[kOrder[2 * j]], b = v[kOrder[2 * j + 1]];
    t[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)  // 128-bit quarters: quarter q of u[j] is input 4j + q
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], 0xDD));
#pragma GCC unroll 2
  for (int j = 0; j < 2; ++j)  // pairs within each quarter
    w[j] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * j], u[2 * j + 1], 0x88),
                         _mm512_shuffle_ps(u[2 * j], u[2 * j + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
}

// R output rows [r0, r0 + R) for all m_rows (<= kGemvMaxRows) rows of x.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void bf16dp_rows(
    const c10::BFloat16* x, int64_t m_rows, int64_t k, const c10::BFloat16* w,
    const int32_t* bits, int64_t nw, const c10::BFloat16* bias, c10::BFloat16* y, int64_t n,
    int64_t r0) {
  constexpr int64_t kChunkWords = 16;  // 512 weights: R x 1 KiB of W + m_rows x 1 KiB of x
  constexpr int MB = R == 4 ? 6 : 8;   // R * MB + R + 1 <= 32 zmm registers (R = 3: 28)
  __m512 acc[R * kGemvMaxRows];  // the first chunk starts from zero; rows past m_rows stay 0
  for (int r = 0; r < R; ++r)
    for (int64_t m = m_rows; m < kGemvMaxRows; ++m) acc[r * kGemvMaxRows + m] = _mm512_setzero_ps();
  const c10::BFloat16* wr = w + r0 * k;
  const int32_t* wb = bits + r0 * nw;
  for (int64_t w0 = 0; w0 < nw; w0 += kChunkWords) {
    const int64_t w1 = std::min(nw, w0 + kChunkWords);
    int64_t m = 0;
    for (; m + MB <= m_rows; m += MB)
      bf16dp_chunk<R, MB>(x + m * k, k, wr, wb, nw, w0, w1, acc + m, kGemvMaxRows);
    for (; m + 2 <= m_rows; m += 2)
      bf16dp_chunk<R, 2>(x + m * k, k, wr, wb, nw, w0, w1, acc + m, kGemvMaxRows);
    for (; m < m_rows; ++m)
      bf16dp_chunk<R, 1>(x + m * k, k, wr, wb, nw, w0, w1, acc + m, kGemvMaxRows);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float b = bias ? static_cast<float>(bias[r0 + r]) : 0.f;
    alignas(64) uint16_t out[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(out),
                       (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(
                           sum16(acc + r * kGemvMaxRows), _mm512_set1_ps(b))));
    for (int64_t m = 0; m < m_rows; ++m) std::memcpy(y + m * n + r0 + r, out + m, 2);
  }
}

static void gemv_bf16dp(const c10::BFloat16* x, int64_t m_rows, int64_t k,
                        const c10::BFloat16* w, const int32_t* bits, const c10::BFloat16* bias,
                        c10::BFloat16* y, int64_t n, int64_t n0, int64_t n1) {
  const int64_t nw = num_words(k);
  int64_t r = n0;
  if (m_rows >= 8) {  // compute-bound: K-chunked, x blocks reuse L1-resident W chunks
    // 16 rows as 8 + 8 with 3 W rows (6 + 6 + 2 + 2 with 4 rows reloaded W for 2 x rows twice):
    // 1.08x against 1.16x dense at 2048x512 and 4096x1024 (interleaved, 2 threads)
    if (m_rows == 16)
      for (; r + 3 <= n1; r += 3) bf16dp_rows<3>(x, m_rows, k, w, bits, nw, bias, y, n, r);
    for (; r + 4 <= n1; r += 4) bf16dp_rows<4>(x, m_rows, k, w, bits, nw, bias, y, n, r);
    for (; r < n1; ++r) bf16dp_rows<1>(x, m_rows, k, w, bits, nw, bias, y, n, r);
    return;
  }
  for (; r + 4 <= n1; r += 4) {  // bandwidth-bound: stream whole rows
    int64_t m = 0;
    for (; m + 4 <= m_rows; m += 4) gemv_tile_bf16dp<4, 4>(x, k, w, bits, nw, bias, y, n, r, m);
    for (; m < m_rows; ++m) gemv_tile_bf16dp<4, 1>(x, k, w, bits, nw, bias, y, n, r, m);
  }
  for (; r < n1; ++r)
    for (int64_t m = 0; m < m_rows; ++m) gemv_tile_bf16dp<1, 1>(x, k, w, bits, nw, bias, y, n, r, m);
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                const c10::optional<at::Tensor>& bias) {
  const int64_t m_rows = x.size(0), k = x.size(1), n = w.size(0);
  auto y = at::empty({m_rows, n}, x.options());
  const int32_t* bp = bits.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, k / 32));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "masked_linear_gemv", [&] {
    const scalar_t* bias_p = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    constexpr bool simd = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;
    if (std::is_same_v<scalar_t, c10::BFloat16> && has_avx512_bf16()) {
      using bf = c10::BFloat16;  // casts are no-ops: this branch runs for bf16 only
      const bf* xp = reinterpret_cast<const bf*>(x.data_ptr<scalar_t>());
      at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
        gemv_bf16dp(xp, m_rows, k, reinterpret_cast<const bf*>(wp), bp,
                    reinterpret_cast<const bf*>(bias_p), reinterpret_cast<bf*>(yp), n, n0, n1);
      });
      return;
    }
    if (simd && has_avx512()) {
      at::Tensor xf = x.to(at::kFloat).contiguous();  // bf16 x widened once, not per row
      const float* xp = xf.data_ptr<float>();
      at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
        if constexpr (simd) gemv_avx512<scalar_t>(xp, m_rows, k, wp, bp, bias_p, yp, n, n0, n1);
      });
    } else {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
        gemv_generic<scalar_t, acc_t>(xp, m_rows, k, wp, bp, bias_p, yp, n, n0, n1);
      });
    }
  });
  return y;
}

}  // namespace lass_sparse_cpu
