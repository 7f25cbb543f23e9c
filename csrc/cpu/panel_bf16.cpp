// bf16 backward kernels with AVX512-BF16 dot products (vdpbf16ps: fp32 accumulators, each
// instruction adds a[2l] b[2l] + a[2l+1] b[2l+1] to lane l), for the few-row training shapes
// where a BLAS call per tile plus a mask pass cost 1.3-2.3x dense (benchmarks/test_masked_linear.py,
// fwd+bwd at M=16). Both write their result once, masked, with no decoded copy of W in memory
// beyond an L2-sized column block:
//   dW = (dyᵀ x) ⊙ M: register tiles of 6 rows of dW x 32 columns, the reduction over dy's rows
//        in pairs (x packed as row pairs, dyᵀ as pairs); the mask word of each 32 columns
//        zeroes the off-mask entries at the store.
//   dx = dy (W ⊙ M): per 256 columns and 512 rows of W, the rows decoded under the mask and
//        interleaved in pairs (n, n+1) once, then every 8 rows of dy reduce over them into fp32
//        accumulators carried across the row chunks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "linear.h"
#include "simd.h"

namespace lass_sparse_cpu {
namespace {
using bf16 = c10::BFloat16;

inline uint16_t raw(const bf16& v) {
  uint16_t r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}

// Pairs of rows r, r + 1 of a [rows, cols] bf16 matrix as 32-bit words (r's value in the low
// half), row-pair-major: out[p * cols + c] = (a[2p][c], a[2p + 1][c]) (0 past the last row).
void pack_row_pairs(const bf16* a, int64_t rows, int64_t cols, std::vector<uint32_t>& out) {
  const int64_t pairs = (rows + 1) / 2;
  out.resize(static_cast<size_t>(pairs * cols));
  const auto* u = reinterpret_cast<const uint16_t*>(a);
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* lo = u + 2 * p * cols;
    const uint16_t* hi = 2 * p + 1 < rows ? u + (2 * p + 1) * cols : nullptr;
    uint32_t* o = out.data() + p * cols;
    if (hi)
      for (int64_t c = 0; c < cols; ++c) o[c] = lo[c] | (static_cast<uint32_t>(hi[c]) << 16);
    else
      for (int64_t c = 0; c < cols; ++c) o[c] = lo[c];
  }
}

// MR x (32 WN) tile of dW: rows n0 + i, mask words wi ... wi + WN - 1:
// Σ_p dyt[p * n + n0 + i] · xp[p][c], stored under the mask words.
template <int MR, int WN>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dw_tile(
    const uint32_t* dyt, int64_t pairs, int64_t n, const __m512i* xp, int64_t wi, int64_t n0,
    int64_t k, const int32_t* bits, int64_t nw, bf16* dw) {
  // every loop over i and j unrolled, so acc stays in registers (see linear.h)
  __m512 acc[MR][2 * WN];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < 2 * WN; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i a[2 * WN];
#pragma GCC unroll 16
    for (int j = 0; j < WN; ++j) {  // word-major: a tile reads one contiguous run per word
      a[2 * j] = xp[((wi + j) * pairs + p) * 2];
      a[2 * j + 1] = xp[((wi + j) * pairs + p) * 2 + 1];
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512i b = _mm512_set1_epi32(static_cast<int32_t>(dyt[p * n + n0 + i]));
#pragma GCC unroll 16
      for (int j = 0; j < 2 * WN; ++j)
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)a[j], (__m512bh)b);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < WN; ++j) {
    const uint32_t valid = valid_lanes(wi + j, k);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const uint32_t keep = static_cast<uint32_t>(bits[(n0 + i) * nw + wi + j]) & valid;
      const __m512i v = _mm512_maskz_mov_epi16(
          keep, (__m512i)_mm512_cvtne2ps_pbh(acc[i][2 * j + 1], acc[i][2 * j]));
      bf16* dst = dw + (n0 + i) * k + (wi + j) * 32;
      // whole aligned lines bypass the cache (dW is written once, larger than L2): no read
      // for ownership
      if (valid == 0xFFFFFFFFu && (reinterpret_cast<uintptr_t>(dst) & 63) == 0)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
      else
        _mm512_mask_storeu_epi16(dst, valid, v);
    }
  }
}

// x [M, K] as row pairs interleaved per column, 32 columns (one mask word) per 2 vectors:
// xp[(w * pairs + p) * 2 + h] holds (x[2p][c], x[2p + 1][c]) for the 16 columns c of half h.
__attribute__((target("avx512f,avx512bw"))) void pack_x_pairs(const bf16* x, int64_t m_rows,
                                                              int64_t k, __m512i* xp) {
  const int64_t words = num_words(k), pairs = (m_rows + 1) / 2;
  const __m512i lo_idx = _mm512_load_si512(kPairLo), hi_idx = _mm512_load_si512(kPairHi);
  for (int64_t p = 0; p < pairs; ++p)
    for (int64_t w = 0; w < words; ++w) {
      const __mmask32 valid = valid_lanes(w, k);
      const __m512i a = _mm512_maskz_loadu_epi16(valid, x + 2 * p * k + w * 32);
      const __m512i b = 2 * p + 1 < m_rows
                            ? _mm512_maskz_loadu_epi16(valid, x + (2 * p + 1) * k + w * 32)
                            : _mm512_setzero_si512();
      xp[(w * pairs + p) * 2] = _mm512_permutex2var_epi16(a, lo_idx, b);
      xp[(w * pairs + p) * 2 + 1] = _mm512_permutex2var_epi16(a, hi_idx, b);
    }
}

// acc[m0 + i][0:32] += Σ_{p in [p0, p1)} dyp[(m0 + i) * pairs + p] · wblk[p - p0] for MR rows
// of dy (acc: fp32 rows of stride lda, carried across chunks of W's rows).
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dx_tile(
    const uint32_t* dyp, int64_t pairs, const __m512i* wblk, int64_t p0, int64_t p1, int64_t m0,
    float* acc, int64_t lda) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    lo[i] = _mm512_loadu_ps(acc + (m0 + i) * lda);
    hi[i] = _mm512_loadu_ps(acc + (m0 + i) * lda + 16);
  }
  for (int64_t p = p0; p < p1; ++p) {
    const __m512i w_lo = wblk[2 * (p - p0)], w_hi = wblk[2 * (p - p0) + 1];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512i b = _mm512_set1_epi32(static_cast<int32_t>(dyp[(m0 + i) * pairs + p]));
      lo[i] = _mm512_dpbf16_ps(lo[i], (__m512bh)w_lo, (__m512bh)b);
      hi[i] = _mm512_dpbf16_ps(hi[i], (__m512bh)w_hi, (__m512bh)b);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(acc + (m0 + i) * lda, lo[i]);
    _mm512_storeu_ps(acc + (m0 + i) * lda + 16, hi[i]);
  }
}

// Row pairs [p0, p1) of W's columns at mask words [wa, wb), under their masks, interleaved:
// wbuf[((wi - wa) * chunk + p - p0) * 2 + h]. Rows outer, words inner: one pass reads a run of
// each row (few pages), not one line per row per word.
__attribute__((target("avx512f,avx512bw"))) void decode_pairs(const bf16* w, int64_t n,
                                                              int64_t k, const int32_t* bits,
                                                              int64_t wa, int64_t wb,
                                                              int64_t p0, int64_t p1,
                                                              int64_t chunk, __m512i* wbuf) {
  const int64_t nw = num_words(k);
  const __m512i lo_idx = _mm512_load_si512(kPairLo), hi_idx = _mm512_load_si512(kPairHi);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t r = 2 * p;
    for (int64_t wi = wa; wi < wb; ++wi) {
      const uint32_t valid = valid_lanes(wi, k);
      const __m512i a = _mm512_maskz_loadu_epi16(
          static_cast<uint32_t>(bits[r * nw + wi]) & valid, w + r * k + wi * 32);
      const __m512i b =
          r + 1 < n ? _mm512_maskz_loadu_epi16(
                          static_cast<uint32_t>(bits[(r + 1) * nw + wi]) & valid,
                          w + (r + 1) * k + wi * 32)
                    : _mm512_setzero_si512();
      __m512i* dst = wbuf + ((wi - wa) * chunk + p - p0) * 2;
      dst[0] = _mm512_permutex2var_epi16(a, lo_idx, b);
      dst[1] = _mm512_permutex2var_epi16(a, hi_idx, b);
    }
  }
}

// Room for `count` 64-byte vectors (CPU allocations are 64-byte aligned).
at::Tensor vectors(int64_t count) { return at::empty({count * 64}, at::kByte); }

}  // namespace

// The tile loops live in target-attributed functions so the tiles inline into them.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void dw_blocks(
    const uint32_t* dyt, int64_t pairs, const __m512i* xp, int64_t words, int64_t n, int64_t k,
    const int32_t* bp, bf16* out, int64_t b0, int64_t b1) {
  constexpr int64_t kMR = 6;
  const int64_t nw = words;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * kMR, rows = std::min(kMR, n - n0);
    int64_t wi = 0;
    if (rows == kMR)
      for (; wi + 2 <= words; wi += 2)
        dw_tile<kMR, 2>(dyt, pairs, n, xp, wi, n0, k, bp, nw, out);
    for (; wi < words; ++wi) {
      switch (rows) {
        case 6: dw_tile<6, 1>(dyt, pairs, n, xp, wi, n0, k, bp, nw, out); break;
        case 5: dw_tile<5, 1>(dyt, pairs, n, xp, wi, n0, k, bp, nw, out); break;
        case 4: dw_tile<4, 1>(dyt, pairs, n, xp, wi, n0, k, bp, nw, out); break;
        case 3: dw_tile<3, 1>(dyt, pairs, n, xp, wi, n0, k, bp, nw, out); break;
        case 2: dw_tile<2, 1>(dyt, pairs, n, xp, wi, n0, k, bp, nw, out); break;
        default: dw_tile<1, 1>(dyt, pairs, n, xp, wi, n0, k, bp, nw, out); break;
      }
    }
  }
  _mm_sfence();  // the streaming stores are visible before the result is used
}

void dw_panel_bf16(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits,
                   at::Tensor& dw) {
  const int64_t m_rows = dy.size(0), n = dy.size(1), k = x.size(1);
  const int64_t pairs = (m_rows + 1) / 2, words = num_words(k);
  std::vector<uint32_t> dyt;  // dy's rows in pairs: dyt[p * n + c], c a column of dy
  pack_row_pairs(dy.data_ptr<bf16>(), m_rows, n, dyt);
  at::Tensor xbuf = vectors(pairs * words * 2);
  auto* xp = reinterpret_cast<__m512i*>(xbuf.data_ptr());
  pack_x_pairs(x.data_ptr<bf16>(), m_rows, k, xp);
  const int32_t* bp = bits.data_ptr<int32_t>();
  bf16* out = dw.data_ptr<bf16>();
  constexpr int64_t kMR = 6;
  const int64_t blocks = (n + kMR - 1) / kMR;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    dw_blocks(dyt.data(), pairs, xp, words, n, k, bp, out, b0, b1);
  });
}

void dx_panel_bf16(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits,
                   at::Tensor& dx) {
  const int64_t m_rows = dy.size(0), n = w.size(0), k = w.size(1);
  const int64_t pairs = (n + 1) / 2, words = num_words(k);
  // dy's rows as pairs along N: dyp[m * pairs + p] = (dy[m][2p], dy[m][2p + 1])
  std::vector<uint32_t> dyp(static_cast<size_t>(m_rows * pairs), 0u);
  const bf16* d = dy.data_ptr<bf16>();
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t p = 0; p < pairs; ++p)
      dyp[m * pairs + p] = static_cast<uint32_t>(raw(d[m * n + 2 * p])) |
                           (2 * p + 1 < n ? static_cast<uint32_t>(raw(d[m * n + 2 * p + 1])) << 16
                                          : 0u);
  const bf16* wp = w.data_ptr<bf16>();
  const int32_t* bp = bits.data_ptr<int32_t>();
  bf16* out = dx.data_ptr<bf16>();
  // A group of kGroup mask words (256 columns) per pass over W's rows, in chunks of kChunk row
  // pairs (the decoded chunk, 256 KB, stays in L2); fp32 accumulators carried across chunks.
  // One 32-column block per pass over all rows read a line of every row per block: at K = 4096
  // (a page per row) that was 1.34-1.63x dense; in groups and chunks 1.03-1.06x (1 thread).
  constexpr int64_t kGroup = 8, kChunk = 256;
  const int64_t groups = (words + kGroup - 1) / kGroup, lda = kGroup * 32;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    at::Tensor buf = vectors(2 * kGroup * kChunk);
    auto* wbuf = reinterpret_cast<__m512i*>(buf.data_ptr());
    std::vector<float> acc(static_cast<size_t>(m_rows * lda));
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t wa = g * kGroup, wb = std::min(words, wa + kGroup);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p0 = 0; p0 < pairs; p0 += kChunk) {
        const int64_t p1 = std::min(pairs, p0 + kChunk);
        decode_pairs(wp, n, k, bp, wa, wb, p0, p1, kChunk, wbuf);
        for (int64_t wi = wa; wi < wb; ++wi) {
          const __m512i* wblk = wbuf + (wi - wa) * kChunk * 2;
          float* a = acc.data() + (wi - wa) * 32;
          int64_t m = 0;
          for (; m + 8 <= m_rows; m += 8) dx_tile<8>(dyp.data(), pairs, wblk, p0, p1, m, a, lda);
          switch (m_rows - m) {
            case 7: dx_tile<7>(dyp.data(), pairs, wblk, p0, p1, m, a, lda); break;
            case 6: dx_tile<6>(dyp.data(), pairs, wblk, p0, p1, m, a, lda); break;
            case 5: dx_tile<5>(dyp.data(), pairs, wblk, p0, p1, m, a, lda); break;
            case 4: dx_tile<4>(dyp.data(), pairs, wblk, p0, p1, m, a, lda); break;
            case 3: dx_tile<3>(dyp.data(), pairs, wblk, p0, p1, m, a, lda); break;
            case 2: dx_tile<2>(dyp.data(), pairs, wblk, p0, p1, m, a, lda); break;
            case 1: dx_tile<1>(dyp.data(), pairs, wblk, p0, p1, m, a, lda); break;
            default: break;
          }
        }
      }
      const int64_t c0 = wa * 32, c1 = std::min(k, wb * 32);
      for (int64_t m = 0; m < m_rows; ++m)
        for (int64_t c = c0; c < c1; ++c)
          out[m * k + c] = static_cast<bf16>(acc[m * lda + (c - c0)]);
    }
  });
}

}  // namespace lass_sparse_cpu
