// dx = dy @ (W ⊙ M) for bf16 at M <= kDxDotMaxRows with AVX512-BF16, without a decoded copy of
// W: for the 32 columns of a mask word, every pair of W rows (n, n+1) is loaded under its mask
// words and interleaved into (W[n, k], W[n+1, k]) pairs, and one dot-product instruction per dy
// row and 16 columns adds dy[m, n] W[n, k] + dy[m, n+1] W[n+1, k] to fp32 accumulators held in
// registers. benchmarks/test_masked_linear.py (dx of few rows), 1 thread, one core busy: M=1
// 0.44-0.51x dense (decode -> GEMM: 1.38-2.44x), M=8 0.83-1.49x (1.25-1.42x); at M=16 it lost
// (1.7-2.2x against 1.3-1.8x: half of a dense GEMM's dot-product throughput), so M=16 keeps
// decode -> GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "linear.h"

namespace lass_sparse_cpu {

// Rows [r0, r1) of W for the 32 columns of mask word `wi` and MR dy rows: acc (fp32, row stride
// k) += dy[:, r0:r1] @ (W ⊙ M)[r0:r1, 32 wi : 32 wi + 32].
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static inline void dx_bf16dp_block(
    const c10::BFloat16* dy, int64_t n, int64_t k, const c10::BFloat16* w, const int32_t* bits,
    int64_t r0, int64_t r1, int64_t wi, float* acc_out) {
  const int64_t nw = num_words(k), k0 = wi * 32;
  const uint32_t valid = valid_lanes(wi, k);
  const __m512i lo_idx = _mm512_load_si512(kPairLo), hi_idx = _mm512_load_si512(kPairHi);
  const auto lanes_lo = static_cast<__mmask16>(valid);
  const auto lanes_hi = static_cast<__mmask16>(valid >> 16);
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    lo[m] = _mm512_maskz_loadu_ps(lanes_lo, acc_out + m * k + k0);
    hi[m] = _mm512_maskz_loadu_ps(lanes_hi, acc_out + m * k + k0 + 16);
  }
  const int32_t* wb = bits + wi;
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    // the lines of the next two blocks of these rows: the walk goes down columns, which the
    // hardware prefetchers do not follow
    _mm_prefetch(reinterpret_cast<const char*>(w + r * k + k0 + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (r + 1) * k + k0 + 64), _MM_HINT_T0);
    const __m512i a = _mm512_maskz_loadu_epi16(
        static_cast<__mmask32>(static_cast<uint32_t>(wb[r * nw]) & valid), w + r * k + k0);
    const __m512i b = _mm512_maskz_loadu_epi16(
        static_cast<__mmask32>(static_cast<uint32_t>(wb[(r + 1) * nw]) & valid),
        w + (r + 1) * k + k0);
    const __m512i plo = _mm512_permutex2var_epi16(a, lo_idx, b);
    const __m512i phi = _mm512_permutex2var_epi16(a, hi_idx, b);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      int32_t d;  // dy[m, r] in the low half, dy[m, r + 1] in the high half
      std::memcpy(&d, dy + m * n + r, sizeof(d));
      const __m512i bc = _mm512_set1_epi32(d);
      lo[m] = _mm512_dpbf16_ps(lo[m], (__m512bh)plo, (__m512bh)bc);
      hi[m] = _mm512_dpbf16_ps(hi[m], (__m512bh)phi, (__m512bh)bc);
    }
  }
  if (r < r1) {  // an odd last row of W, paired with a zero row
    const __m512i a = _mm512_maskz_loadu_epi16(
        static_cast<__mmask32>(static_cast<uint32_t>(wb[r * nw]) & valid), w + r * k + k0);
    const __m512i z = _mm512_setzero_si512();
    const __m512i plo = _mm512_permutex2var_epi16(a, lo_idx, z);
    const __m512i phi = _mm512_permutex2var_epi16(a, hi_idx, z);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      uint16_t d;
      std::memcpy(&d, dy + m * n + r, sizeof(d));
      const __m512i bc = _mm512_set1_epi32(static_cast<int32_t>(d));
      lo[m] = _mm512_dpbf16_ps(lo[m], (__m512bh)plo, (__m512bh)bc);
      hi[m] = _mm512_dpbf16_ps(hi[m], (__m512bh)phi, (__m512bh)bc);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    _mm512_mask_storeu_ps(acc_out + m * k + k0, lanes_lo, lo[m]);
    _mm512_mask_storeu_ps(acc_out + m * k + k0 + 16, lanes_hi, hi[m]);
  }
}

// dx[MR rows] = dy[MR rows] @ (W ⊙ M): each thread owns a range of 32-column blocks and walks W
// in chunks of kChunkRows rows, so a chunk's pages and lines stay in the TLB and L2 while every
// column block reads it; accumulators go through an fp32 row buffer between chunks.
template <int MR>
static void dx_bf16dp_rows(const c10::BFloat16* dy, int64_t n, int64_t k,
                           const c10::BFloat16* w, const int32_t* bits, c10::BFloat16* dx) {
  constexpr int64_t kChunkRows = 64;
  std::vector<float> acc(static_cast<size_t>(MR * k), 0.f);
  at::parallel_for(0, num_words(k), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t r0 = 0; r0 < n; r0 += kChunkRows) {
      const int64_t r1 = std::min(n, r0 + kChunkRows);
      for (int64_t b = b0; b < b1; ++b)
        dx_bf16dp_block<MR>(dy, n, k, w, bits, r0, r1, b, acc.data());
    }
    const int64_t c0 = b0 * 32, c1 = std::min(k, b1 * 32);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
      for (int64_t c = c0; c < c1; ++c)
        dx[m * k + c] = static_cast<c10::BFloat16>(acc[m * k + c]);
  });
}

// Rows of dy in blocks of 8, 4, 2, 1 (accumulators in registers: up to 16 + 5 zmm).
void dx_bf16dp(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits,
               at::Tensor& dx) {
  const int64_t m_rows = dy.size(0), n = w.size(0), k = w.size(1);
  const auto* dyp = dy.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  const int32_t* bp = bits.data_ptr<int32_t>();
  auto* dxp = dx.data_ptr<c10::BFloat16>();
  int64_t m = 0;
  for (; m + 8 <= m_rows; m += 8) dx_bf16dp_rows<8>(dyp + m * n, n, k, wp, bp, dxp + m * k);
  for (; m + 4 <= m_rows; m += 4) dx_bf16dp_rows<4>(dyp + m * n, n, k, wp, bp, dxp + m * k);
  for (; m + 2 <= m_rows; m += 2) dx_bf16dp_rows<2>(dyp + m * n, n, k, wp, bp, dxp + m * k);
  for (; m < m_rows; ++m) dx_bf16dp_rows<1>(dyp + m * n, n, k, wp, bp, dxp + m * k);
}

}  // namespace lass_sparse_cpu
