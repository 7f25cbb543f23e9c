// The float32 backward for few rows (M <= kSmallBwdMaxRows): dx = dy (W ⊙ M) and
// dW = (dyᵀ x) ⊙ M without a decoded W tile or a GEMM call. dx makes one pass over W, adding
// dy[m, r] · (W ⊙ M)[r, cols] into dx[m, cols] row after row (the mask applied by masked loads;
// with AVX-512 a block of dx columns stays in registers for all rows); dW makes one pass over
// dW, each entry Σ_m dy[m, r] x[m, c] stored where the mask is 1 (0 elsewhere, or left alone
// when accumulating; with AVX-512 and 3+ rows, 4 weight rows share each x load). Threads split dx's columns / dW's rows, only
// when a thread gets kSmallBwdMinWork multiply-adds; every entry is summed in a fixed order by
// one thread, so results do not depend on the thread count. The portable loops use std::fma in
// the same order as the AVX-512 path: the two agree bit for bit.
// Its row limit and the measurement behind it: kSmallBwdMaxRows (linear.h).
#include <ATen/Parallel.h>

#include <cmath>

#include "linear.h"
#include "simd.h"

namespace lass_sparse_cpu {
namespace {

// Columns [c0, c1) of dx (c0 a multiple of 32) for rows m < m_rows; dx rows are k apart.
void dx_block_generic(const float* dy, int64_t n, const float* w, const int32_t* bits, int64_t k,
                      int64_t m_rows, int64_t c0, int64_t c1, float* dx) {
  const int64_t nw = num_words(k);
  for (int64_t m = 0; m < m_rows; ++m) std::fill(dx + m * k + c0, dx + m * k + c1, 0.f);
  for (int64_t r = 0; r < n; ++r) {
    const float* wr = w + r * k;
    const int32_t* br = bits + r * nw;
    for (int64_t c = c0; c < c1; c += 32) {
      const uint32_t word = run_word(br, c / 32, k);
      const int64_t cols = std::min<int64_t>(32, c1 - c);
      for (int64_t m = 0; m < m_rows; ++m) {
        const float s = dy[m * n + r];
        float* d = dx + m * k + c;
        for (int64_t j = 0; j < cols; ++j)
          d[j] = std::fma(s, ((word >> j) & 1u) ? wr[c + j] : 0.f, d[j]);
      }
    }
  }
}

// AVX-512 dx for columns [c0, c1): CH chunks of 16 columns at a time, their dx rows
// (m_rows <= MT) held in registers while the weight rows stream past (CH masked W loads, one
// broadcast per dx row and MT * CH FMAs per weight row); each entry sums r = 0..n-1 in order
// from 0, as the generic loop. MT * CH <= 16 accumulators; CH = 8 walks a 128-column block of
// each weight row (the unit dx_small_m splits by) as one sequential run.
template <int MT, int CH>
__attribute__((target("avx512f,avx512bw"))) void dx_cols_avx512(
    const float* dy, int64_t n, const float* w, const int32_t* bits, int64_t k, int64_t m_rows,
    int64_t c0, int64_t c1, float* dx) {
  const int64_t nw = num_words(k);
  for (int64_t c = c0; c < c1; c += 16 * CH) {
    __mmask16 v[CH];
#pragma GCC unroll 8
    for (int h = 0; h < CH; ++h) {
      const int64_t ch = c + 16 * h;
      v[h] = ch < c1 ? static_cast<__mmask16>(valid_lanes(ch / 32, c1) >> (ch % 32)) : 0;
    }
    __m512 acc[MT][CH];
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
      for (int h = 0; h < CH; ++h) acc[m][h] = _mm512_setzero_ps();
    for (int64_t r = 0; r < n; ++r) {
      const int32_t* br = bits + r * nw;
      __m512 a[CH];
#pragma GCC unroll 8
      for (int h = 0; h < CH; ++h) {
        const int64_t ch = c + 16 * h;
        const auto on = v[h] ? static_cast<__mmask16>(run_word(br, ch / 32, k) >> (ch % 32)) : 0;
        a[h] = _mm512_maskz_loadu_ps(on & v[h], w + r * k + ch);
      }
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) {
        if (m >= m_rows) break;
        const __m512 s = _mm512_set1_ps(dy[m * n + r]);
#pragma GCC unroll 8
        for (int h = 0; h < CH; ++h) acc[m][h] = _mm512_fmadd_ps(s, a[h], acc[m][h]);
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      if (m >= m_rows) break;
#pragma GCC unroll 8
      for (int h = 0; h < CH; ++h) _mm512_mask_storeu_ps(dx + m * k + c + 16 * h, v[h], acc[m][h]);
    }
  }
}

void dx_block_avx512(const float* dy, int64_t n, const float* w, const int32_t* bits, int64_t k,
                     int64_t m_rows, int64_t c0, int64_t c1, float* dx) {
  if (m_rows <= 2) return dx_cols_avx512<2, 8>(dy, n, w, bits, k, m_rows, c0, c1, dx);
  if (m_rows <= 4) return dx_cols_avx512<4, 4>(dy, n, w, bits, k, m_rows, c0, c1, dx);
  if (m_rows <= 8) return dx_cols_avx512<8, 2>(dy, n, w, bits, k, m_rows, c0, c1, dx);
  for (int64_t m0 = 0; m0 < m_rows; m0 += 16)  // 16 rows at a time (a raised row limit)
    dx_cols_avx512<16, 1>(dy + m0 * n, n, w, bits, k, std::min<int64_t>(16, m_rows - m0), c0,
                          c1, dx + m0 * k);
}

// Rows [r0, r1) of dW (rows k apart): Σ_m dy[m, r] x[m, :], masked.
void dw_block_generic(const float* dy, int64_t n, const float* x, const int32_t* bits, int64_t k,
                      int64_t m_rows, int64_t r0, int64_t r1, float* dw, bool accumulate) {
  const int64_t nw = num_words(k);
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* br = bits + r * nw;
    float* d = dw + r * k;
    for (int64_t c = 0; c < k; c += 32) {
      const uint32_t word = run_word(br, c / 32, k);
      const int64_t cols = std::min<int64_t>(32, k - c);
      for (int64_t j = 0; j < cols; ++j) {
        float acc = 0.f;
        for (int64_t m = 0; m < m_rows; ++m) acc = std::fma(dy[m * n + r], x[m * k + c + j], acc);
        const bool on = (word >> j) & 1u;
        if (accumulate) {
          if (on) d[c + j] += acc;
        } else {
          d[c + j] = on ? acc : 0.f;
        }
      }
    }
  }
}

// AVX-512 dW one weight row at a time (1-2 rows of x: nothing to share between rows).
__attribute__((target("avx512f,avx512bw"))) void dw_rows_avx512(
    const float* dy, int64_t n, const float* x, const int32_t* bits, int64_t k, int64_t m_rows,
    int64_t r0, int64_t r1, float* dw, bool accumulate) {
  const int64_t nw = num_words(k);
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* br = bits + r * nw;
    float* d = dw + r * k;
    for (int64_t c = 0; c < k; c += 32) {
      const uint32_t word = run_word(br, c / 32, k), valid = valid_lanes(c / 32, k);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const auto v = static_cast<__mmask16>(valid >> (16 * h));
        const auto on = static_cast<__mmask16>(word >> (16 * h));
        __m512 acc = _mm512_setzero_ps();
        for (int64_t m = 0; m < m_rows; ++m)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(dy[m * n + r]),
                                _mm512_maskz_loadu_ps(v, x + m * k + c + 16 * h), acc);
        float* p = d + c + 16 * h;
        if (accumulate)  // lanes past k are off in `word`
          _mm512_mask_storeu_ps(p, on, _mm512_add_ps(_mm512_maskz_loadu_ps(on, p), acc));
        else
          _mm512_mask_storeu_ps(p, v, _mm512_maskz_mov_ps(on, acc));
      }
    }
  }
}

// AVX-512 dW for rows [r0, r1): four weight rows at a time share each 16-column x load; each
// entry sums m = 0..m_rows-1 in order from 0, as the generic loop.
__attribute__((target("avx512f,avx512bw"))) void dw_blocked_avx512(
    const float* dy, int64_t n, const float* x, const int32_t* bits, int64_t k, int64_t m_rows,
    int64_t r0, int64_t r1, float* dw, bool accumulate) {
  constexpr int kRows = 4;
  const int64_t nw = num_words(k);
  for (int64_t rb = r0; rb < r1; rb += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, r1 - rb));
    for (int64_t c = 0; c < k; c += 16) {
      const int shift = static_cast<int>(c % 32);
      const auto v = static_cast<__mmask16>(valid_lanes(c / 32, k) >> shift);
      __m512 acc[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                           _mm512_setzero_ps()};
      for (int64_t m = 0; m < m_rows; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(v, x + m * k + c);
#pragma GCC unroll 4
        for (int i = 0; i < kRows; ++i)
          if (i < rows) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(dy[m * n + rb + i]), xv, acc[i]);
      }
#pragma GCC unroll 4
      for (int i = 0; i < kRows; ++i) {
        if (i >= rows) break;
        const auto on = static_cast<__mmask16>(run_word(bits + (rb + i) * nw, c / 32, k) >> shift);
        float* p = dw + (rb + i) * k + c;
        if (accumulate)  // lanes past k are off in `on`
          _mm512_mask_storeu_ps(p, on, _mm512_add_ps(_mm512_maskz_loadu_ps(on, p), acc[i]));
        else
          _mm512_mask_storeu_ps(p, v, _mm512_maskz_mov_ps(on, acc[i]));
      }
    }
  }
}

void dw_block_avx512(const float* dy, int64_t n, const float* x, const int32_t* bits, int64_t k,
                     int64_t m_rows, int64_t r0, int64_t r1, float* dw, bool accumulate) {
  (m_rows <= 2 ? dw_rows_avx512 : dw_blocked_avx512)(dy, n, x, bits, k, m_rows, r0, r1, dw,
                                                     accumulate);
}

// Blocks of `unit` items (columns or rows) per task so that each holds >= kSmallBwdMinWork
// multiply-adds (`per_item` each); one task runs inline.
template <typename F>
void split(int64_t items, int64_t unit, int64_t per_item, const F& body) {
  const int64_t blocks = (items + unit - 1) / unit;
  const int64_t per_block = std::max<int64_t>(1, unit * per_item);
  const int64_t grain = std::max<int64_t>(1, kSmallBwdMinWork / per_block);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    body(b0 * unit, std::min(items, b1 * unit));
  });
}

}  // namespace

void dx_small_m(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits,
                at::Tensor& dx) {
  const int64_t m_rows = dy.size(0), n = w.size(0), k = w.size(1);
  const float* dyp = dy.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const int32_t* bp = bits.data_ptr<int32_t>();
  float* dxp = dx.data_ptr<float>();
  const auto block = has_avx512() ? dx_block_avx512 : dx_block_generic;
  split(k, 128, n * m_rows,
        [&](int64_t c0, int64_t c1) { block(dyp, n, wp, bp, k, m_rows, c0, c1, dxp); });
}

void dw_small_m(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits,
                at::Tensor& dw, bool accumulate) {
  const int64_t m_rows = dy.size(0), n = dy.size(1), k = x.size(1);
  const float* dyp = dy.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int32_t* bp = bits.data_ptr<int32_t>();
  float* dwp = dw.data_ptr<float>();
  const auto block = has_avx512() ? dw_block_avx512 : dw_block_generic;
  split(n, 4, k * m_rows,
        [&](int64_t r0, int64_t r1) { block(dyp, n, xp, bp, k, m_rows, r0, r1, dwp, accumulate); });
}

}  // namespace lass_sparse_cpu
