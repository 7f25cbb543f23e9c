// Fused masked linear on the CPU: y = x @ (W ⊙ M)ᵀ + b, dx = dy @ (W ⊙ M), dW = (dyᵀ x) ⊙ M.
// W ⊙ M is never materialised whole:
//  * small M (decode, M <= kGemvMaxRows): the mask bits are decoded inside the inner loop
//    (AVX-512 masked loads: a mask word is the lane mask), parallel over output rows;
//  * larger M: one cache-sized tile of W ⊙ M (rows for y and dW, columns for dx) is decoded
//    at a time into a per-thread buffer and handed to the BLAS GEMM (at::mm_out into the
//    output slice). Tiles are spread over threads; each GEMM runs single-threaded.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "panel.h"
#include "simd.h"

namespace lass_sparse_cpu {

// Every loop over a register tile's rows or vectors carries `#pragma GCC unroll`: one left
// rolled makes GCC keep the tile's accumulators in a stack array, a store and a load each per
// tile (the bf16 dW tile ran at 1.3-1.5x dense dW at M = 16 that way, 0.9-1.0x unrolled).
constexpr int64_t kGemvMaxRows = 16;

// Largest M served by the decode GEMV (the rest: tiled decode -> BLAS). Env overrides per dtype:
// LASS_SPARSE_CPU_GEMV_MAX_M (fp32/fp64), LASS_SPARSE_CPU_GEMV_MAX_M_BF16.
static int64_t gemv_max_rows(at::ScalarType t) {
  static const int64_t f32 = [] {
    const char* env = std::getenv("LASS_SPARSE_CPU_GEMV_MAX_M");
    return env ? std::min<int64_t>(std::atoll(env), kGemvMaxRows) : kGemvMaxRows;
  }();
  static const int64_t bf16 = [] {
    const char* env = std::getenv("LASS_SPARSE_CPU_GEMV_MAX_M_BF16");
    return env ? std::min<int64_t>(std::atoll(env), kGemvMaxRows) : kGemvMaxRows;
  }();
  return t == at::kBFloat16 ? bf16 : f32;
}

static int64_t tile_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("LASS_SPARSE_CPU_TILE_KB");
    const int64_t kb = env ? std::atoll(env) : 512;
    return std::max<int64_t>(kb, 16) * 1024;
  }();
  return bytes;
}

// Rows (or columns) per tile: ~tile_bytes() of W ⊙ M, a multiple of `align`, at least `align`,
// and no more than an equal share per thread (every thread gets a tile when there are enough
// rows). The default 512 KB keeps a decoded tile in L2 for its GEMM; 2 MB was faster for the
// bf16 dx/dW at M = 16 (fewer, wider GEMM calls) but slower at M = 32-512 (measured on a busy
// 2-core machine; LASS_SPARSE_CPU_TILE_KB overrides).
static int64_t tile_extent(int64_t other, int64_t elt, int64_t total, int64_t align,
                           int64_t scale = 1) {
  int64_t t = scale * tile_bytes() / std::max<int64_t>(1, other * elt);
  t = std::max<int64_t>(align, (t / align) * align);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t share = ((total + threads - 1) / threads + align - 1) / align * align;
  t = std::min(t, std::max(align, share));
  return std::min<int64_t>(t, std::max<int64_t>(total, 1));
}

// The backward's GEMMs at M <= kWideTileMaxM rows are skinny (dx: [M, N] @ [N, kc]; dW: an outer
// product [tn, M] @ [M, K]), so their tiles are 4x wider: fewer, larger calls. Measured at M=16
// bf16, 1 thread: dx 346 -> 280 us and dW 337 -> 249 us at 2048x512, dW 1.40 -> 0.99 ms at
// 4096x1024. (4x tiles for every op and M were slower at M = 32-512 in an earlier measurement;
// above this range kMinTile sets a floor on the tiles instead.)
constexpr int64_t kWideTileMaxM = 16;
// Smallest tile extent (forward and dW rows, dx columns) above that range: each tile's GEMM
// repacks the whole activation operand; see tiled_forward, dw_tiles and masked_linear_dx.
constexpr int64_t kMinTile = 256;

// kMinTile, or an equal share per thread of `total` when that is smaller.
static int64_t min_tile(int64_t total, int64_t align) {
  return std::min(kMinTile, tile_extent(1, 1, total, align));
}

static void check_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                         const char* op) {
  check_float_2d(x, op, "x");
  check_float_2d(w, op, "weight");
  LASS_CHECK(x.size(1) == w.size(1), op, ": x must be [M, K] and weight [N, K], got ",
              x.sizes(), " and ", w.sizes());
  LASS_CHECK(x.scalar_type() == w.scalar_type(), op, ": x and weight dtypes differ (",
              x.scalar_type(), ", ", w.scalar_type(), ")");
  check_bits(bits, {w.size(0)}, w.size(1), op);
}

// ------------------------------------------------------------------------------ GEMV (small M)

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
  if (m_rows < 4) {  // bandwidth-bound: 4 weight rows at a time
    for (; r + 4 <= n1; r += 4)
      for (int64_t m = 0; m < m_rows; ++m) gemv_tile<T, 4, 1>(x, k, w, bits, nw, bias, y, n, r, m);
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
static bool has_avx512_bf16() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

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

static at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
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

// ------------------------------------------------------------------------- tiled (larger M)

// out[r - r0, :] = (W ⊙ M)[r, k0:k0+kc] for r in [r0, r1); k0 is a multiple of 32.
template <typename T>
static void decode_block(const T* w, const int32_t* bits, int64_t k, int64_t r0, int64_t r1,
                         int64_t k0, int64_t kc, T* out) {
  const int64_t nw = num_words(k);
  for (int64_t r = r0; r < r1; ++r)
    masked_copy(w + r * k + k0, bits + r * nw + k0 / 32, kc, out + (r - r0) * kc);
}

// ---- fp32 panel GEMM (AVX-512): segments of x against decoded tiles of W, without BLAS.
// x is packed once per call into panels of 32 rows, k-major (panel[k][j] = x[row0 + j][k], zero
// past the segment's end), so no panel mixes two segments (two pairs). A tile of W's rows is
// decoded (W ⊙ M_p, row-major) into an L2-sized buffer once per pair change, as in
// tiled_segments, and a 6 x 32 register tile (6 W rows broadcast, 2 x 16 panel columns) runs the
// whole K: 12 FMAs per 2 panel loads and 6 broadcasts. One core, K = 512-2048, operands in L2:
// 115 GFLOP/s (MR = 4: 85, MR = 12: 70-91); the BLAS GEMM torch calls reached about 90 on the
// dense single-pair shape. Per-segment BLAS calls repack the decoded tile for every 32-row
// segment and ran 16 pairs at 1.25-1.6x dense (benchmarks/test_segmented.py); the panel kernel
// 0.90-1.17x (2 threads, one run).
constexpr int kPanelRows = 32;
constexpr int kPanelMR = 6;

// out[i][j] = Σ_k w[i * ldw + k] panel[k][j] for i < MR, j < 16 NV (NV = 1: a panel's last
// rows, at most 16, without the zero half).
template <int MR, int NV>
__attribute__((target("avx512f"))) static inline void panel_kernel(const float* w, int64_t ldw,
                                                                   const float* panel,
                                                                   int64_t k, float* out) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 a[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) a[v] = _mm512_loadu_ps(panel + kk * kPanelRows + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 b = _mm512_set1_ps(w[i * ldw + kk]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(b, a[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + i * kPanelRows + 16 * v, acc[i][v]);
}

// y[rows, c0 + i] = out[i][j] (+ bias) for the `rows` valid panel rows starting at y row m0.
template <int MR>
static void panel_block(const float* wd, int64_t k, const float* panel, int64_t rows,
                        const float* bias, float* y, int64_t n, int64_t m0, int64_t c0) {
  alignas(64) float out[kPanelMR * kPanelRows];
  if (rows <= 16)
    panel_kernel<MR, 1>(wd, k, panel, k, out);
  else
    panel_kernel<MR, 2>(wd, k, panel, k, out);
  for (int64_t j = 0; j < rows; ++j) {
    float* yr = y + (m0 + j) * n + c0;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) yr[i] = out[i * kPanelRows + j] + (bias ? bias[c0 + i] : 0.f);
  }
}

// $LASS_SPARSE_CPU_PANEL_GEMM=0 turns the panel kernel off (the BLAS path: benchmarks, tests).
static bool panel_gemm_enabled() {
  const char* v = std::getenv("LASS_SPARSE_CPU_PANEL_GEMM");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// An integer knob from the environment, or `fallback` (callers keep it in a static: read once).
static int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : fallback;
}

struct Panel {
  int64_t seg, row0, rows;  // segment, first row of x, valid rows (<= 32)
};

// The panels of every segment, in segment order, and x packed into them (in parallel).
static std::vector<Panel> pack_panels(const float* x, int64_t k, const int64_t* offs,
                                      int64_t segs, at::Tensor& packed) {
  std::vector<Panel> panels;
  for (int64_t s = 0; s < segs; ++s)
    for (int64_t a = offs[s]; a < offs[s + 1]; a += kPanelRows)
      panels.push_back({s, a, std::min<int64_t>(kPanelRows, offs[s + 1] - a)});
  packed = at::empty({static_cast<int64_t>(panels.size()), k, kPanelRows}, at::kFloat);
  float* pp = packed.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(panels.size()), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = pp + p * k * kPanelRows;
      const Panel& pn = panels[p];
      for (int64_t j = 0; j < kPanelRows; ++j) {
        if (j < pn.rows) {
          const float* src = x + (pn.row0 + j) * k;
          for (int64_t kk = 0; kk < k; ++kk) dst[kk * kPanelRows + j] = src[kk];
        } else {
          for (int64_t kk = 0; kk < k; ++kk) dst[kk * kPanelRows + j] = 0.f;
        }
      }
    }
  });
  return panels;
}

// tiled_segments for fp32 with AVX-512: the same loop over W's tiles and pairs, the panel
// kernel instead of a BLAS call per segment.
static void panel_segments(const at::Tensor& x, const at::Tensor& w, const int32_t* bits,
                           int64_t bank_stride, const int64_t* offs, const int64_t* pid,
                           int64_t segs, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t k = x.size(1), n = w.size(0);
  at::Tensor packed;
  const std::vector<Panel> panels = pack_panels(x.data_ptr<float>(), k, offs, segs, packed);
  // a decoded tile of at most ~256 KB (L2 holds it beside a panel), whole register tiles
  int64_t tn = std::max<int64_t>(kPanelMR, (256 * 1024 / (4 * k)) / kPanelMR * kPanelMR);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t share = (n + 2 * threads - 1) / (2 * threads);  // >= 2 tiles per thread
  tn = std::min(tn, std::max<int64_t>(kPanelMR, (share + kPanelMR - 1) / kPanelMR * kPanelMR));
  const int64_t tiles = (n + tn - 1) / tn;
  const float* wp = w.data_ptr<float>();
  const float* pp = packed.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<float[]> buf(new float[static_cast<size_t>(tn * k)]);  // not zeroed
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tn, r1 = std::min(n, r0 + tn);
      int64_t decoded = -1;
      for (size_t p = 0; p < panels.size(); ++p) {
        const Panel& pn = panels[p];
        if (pid[pn.seg] != decoded) {
          decode_block(wp, bits + pid[pn.seg] * bank_stride, k, r0, r1, 0, k, buf.get());
          decoded = pid[pn.seg];
        }
        const float* panel = pp + static_cast<int64_t>(p) * k * kPanelRows;
        int64_t r = r0;
        for (; r + kPanelMR <= r1; r += kPanelMR)
          panel_block<kPanelMR>(buf.get() + (r - r0) * k, k, panel, pn.rows, bp, yp, n, pn.row0,
                                r);
        switch (r1 - r) {  // the tile's last rows
          case 5: panel_block<5>(buf.get() + (r - r0) * k, k, panel, pn.rows, bp, yp, n, pn.row0, r); break;
          case 4: panel_block<4>(buf.get() + (r - r0) * k, k, panel, pn.rows, bp, yp, n, pn.row0, r); break;
          case 3: panel_block<3>(buf.get() + (r - r0) * k, k, panel, pn.rows, bp, yp, n, pn.row0, r); break;
          case 2: panel_block<2>(buf.get() + (r - r0) * k, k, panel, pn.rows, bp, yp, n, pn.row0, r); break;
          case 1: panel_block<1>(buf.get() + (r - r0) * k, k, panel, pn.rows, bp, yp, n, pn.row0, r); break;
          default: break;
        }
      }
    }
  });
}

// y[offs[s]:offs[s+1], :] = x[offs[s]:offs[s+1], :] @ (W ⊙ M_pid[s])ᵀ (+ bias) for every segment
// s; M_p's bits start at bits + p * bank_stride. Tiles of W's rows are the outer loop (spread over
// threads) and segments the inner one, so a tile of W is read from memory once and decoded once
// per pair change while it is cache-hot; each segment's rows then go through one GEMM.
static void tiled_segments(const at::Tensor& x, const at::Tensor& w, const int32_t* bits,
                           int64_t bank_stride, const int64_t* offs, const int64_t* pid,
                           int64_t segs, const c10::optional<at::Tensor>& bias, at::Tensor& y,
                           int64_t scale, bool floor = false) {
  const int64_t k = x.size(1), n = w.size(0);
  int64_t tn = tile_extent(k, w.element_size(), n, 16, scale);
  if (floor) tn = std::max(tn, min_tile(n, 16));
  const int64_t tiles = (n + tn - 1) / tn;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "masked_linear_tiled", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: per worker thread
      auto buf = at::empty({tn, k}, w.options());
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tn, r1 = std::min(n, r0 + tn);
        auto wt = buf.narrow(0, 0, r1 - r0).t();
        int64_t decoded = -1;  // the pair whose mask the buffer holds
        for (int64_t s = 0; s < segs; ++s) {
          const int64_t a = offs[s], b = offs[s + 1];
          if (a == b) continue;
          if (pid[s] != decoded) {
            decode_block(wp, bits + pid[s] * bank_stride, k, r0, r1, 0, k,
                         buf.data_ptr<scalar_t>());
            decoded = pid[s];
          }
          auto out = y.narrow(0, a, b - a).narrow(1, r0, r1 - r0);
          auto xs = x.narrow(0, a, b - a);
          if (bias.has_value())
            at::addmm_out(out, bias->narrow(0, r0, r1 - r0).unsqueeze(0).expand({b - a, r1 - r0}),
                          xs, wt);
          else
            at::mm_out(out, xs, wt);
        }
      }
    });
  });
}

static at::Tensor tiled_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                                const c10::optional<at::Tensor>& bias) {
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  const int64_t offs[2] = {0, x.size(0)}, pid[1] = {0};
  if (x.scalar_type() == at::kFloat && has_avx512() && panel_gemm_enabled()) {
    // fp32, 2 threads, against F.linear (one run): M=32 0.68-0.80x (BLAS tiles 0.83-1.03x),
    // M=128 0.78-0.98x (0.92-1.08x), M=512 0.82-1.09x (0.92-1.08x) at 2048x512 to 4096x4096
    panel_segments(x, w, bits.data_ptr<int32_t>(), 0, offs, pid, 1, bias, y);
    return y;
  }
  // Each tile's GEMM repacks all of x: at least kMinTile rows (or a thread's share) above the
  // GEMV range, as in the backward (fp32 M=512 4096x4096: 32-row tiles were 1.17x dense).
  tiled_segments(x, w, bits.data_ptr<int32_t>(), 0, offs, pid, 1, bias, y, 1,
                 x.size(0) > kWideTileMaxM);
  return y;
}

// Mixed-pair batch: rows [seg_offsets[s], seg_offsets[s+1]) of x use pair seg_pair[s]'s mask
// (one pass over W's tiles for all segments: tiled_segments).
at::Tensor segmented_masked_linear(const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& bits_bank, const at::Tensor& seg_offsets,
                                   const at::Tensor& seg_pair,
                                   const c10::optional<at::Tensor>& bias) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "segmented_masked_linear";
  check_float_2d(x, op, "x");
  check_float_2d(w, op, "weight");
  LASS_CHECK(x.size(1) == w.size(1) && x.scalar_type() == w.scalar_type(), op,
              ": x must be ", w.scalar_type(), "[T, K=", w.size(1), "], got ", x.scalar_type(),
              x.sizes());
  const int64_t t_rows = x.size(0), n = w.size(0), k = w.size(1);
  check_cpu(bits_bank, op, "bits_bank");
  LASS_CHECK(bits_bank.dim() == 3, op, ": bits_bank must be int32[P, N, ceil(K/32)], got ",
              bits_bank.sizes());
  const int64_t pairs = bits_bank.size(0);
  check_exact(bits_bank, op, "bits_bank", at::kInt, {pairs, n, num_words(k)});
  check_cpu(seg_offsets, op, "seg_offsets");
  check_cpu(seg_pair, op, "seg_pair");
  const int64_t segs = seg_pair.size(0);
  check_exact(seg_pair, op, "seg_pair", at::kLong, {segs});
  check_exact(seg_offsets, op, "seg_offsets", at::kLong, {segs + 1});
  if (bias.has_value()) check_exact(*bias, op, "bias", w.scalar_type(), {n});
  const int64_t* offs = seg_offsets.data_ptr<int64_t>();
  const int64_t* pid = seg_pair.data_ptr<int64_t>();
  LASS_CHECK(offs[0] == 0 && offs[segs] == t_rows, op, ": seg_offsets must run from 0 to T=",
              t_rows);
  for (int64_t s = 0; s < segs; ++s) {
    LASS_CHECK(offs[s] <= offs[s + 1], op, ": seg_offsets must be non-decreasing");
    LASS_CHECK(pid[s] >= 0 && pid[s] < pairs, op, ": seg_pair ids must be in [0, P=", pairs,
                "), got ", pid[s]);
  }
  auto y = at::empty({t_rows, n}, x.options());
  if (t_rows == 0 || n == 0) return y;
  if (k == 0) {
    if (bias.has_value()) return y.copy_(bias->unsqueeze(0).expand({t_rows, n}));
    return y.zero_();
  }
  if (x.scalar_type() == at::kFloat && has_avx512() && panel_gemm_enabled()) {
    panel_segments(x, w, bits_bank.data_ptr<int32_t>(), n * num_words(k), offs, pid, segs, bias,
                   y);
    return y;
  }
  // 4x the usual tile: each segment's GEMM has few rows, so wider tiles mean fewer calls
  tiled_segments(x, w, bits_bank.data_ptr<int32_t>(), n * num_words(k), offs, pid, segs, bias, y,
                 4);
  return y;
}

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                         const c10::optional<at::Tensor>& bias) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear(x, w, bits, "masked_linear");
  if (bias.has_value()) check_exact(*bias, "masked_linear", "bias", w.scalar_type(), {w.size(0)});
  if (x.size(0) == 0 || w.size(0) == 0 || w.size(1) == 0) {
    auto y = at::zeros({x.size(0), w.size(0)}, x.options());
    if (bias.has_value() && x.size(0)) y.add_(*bias);
    return y;
  }
  if (x.size(0) <= gemv_max_rows(w.scalar_type())) return gemv(x, w, bits, bias);
  return tiled_forward(x, w, bits, bias);
}

// dx = dy @ (W ⊙ M) for bf16 at M <= kDxDotMaxRows with AVX512-BF16, without a decoded copy of
// W: for the 32 columns of a mask word, every pair of W rows (n, n+1) is loaded under its mask
// words and interleaved into (W[n, k], W[n+1, k]) pairs, and one dot-product instruction per dy
// row and 16 columns adds dy[m, n] W[n, k] + dy[m, n+1] W[n+1, k] to fp32 accumulators held in
// registers. benchmarks/test_masked_linear.py (dx of few rows), 1 thread, one core busy: M=1
// 0.44-0.51x dense (decode -> GEMM: 1.38-2.44x), M=8 0.83-1.49x (1.25-1.42x); at M=16 it lost
// (1.7-2.2x against 1.3-1.8x: half of a dense GEMM's dot-product throughput), so M=16 keeps
// decode -> GEMM.
constexpr int64_t kDxDotMaxRows = 8;
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
static void dx_bf16dp(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits,
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

at::Tensor masked_linear_dx(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_float_2d(w, "masked_linear_dx", "weight");
  check_float_2d(dy, "masked_linear_dx", "grad_out");
  LASS_CHECK(dy.size(1) == w.size(0) && dy.scalar_type() == w.scalar_type(),
              "masked_linear_dx: grad_out must be ", w.scalar_type(), "[M, N=", w.size(0),
              "], got ", dy.scalar_type(), dy.sizes());
  check_bits(bits, {w.size(0)}, w.size(1), "masked_linear_dx");
  const int64_t m_rows = dy.size(0), n = w.size(0), k = w.size(1);
  auto dx = at::empty({m_rows, k}, dy.options());
  if (m_rows == 0 || k == 0) return dx;
  if (n == 0) return dx.zero_();
  static const int64_t dp_max_m =
      std::min<int64_t>(env_int("LASS_SPARSE_CPU_DX_DP_MAX_M", kDxDotMaxRows), kGemvMaxRows);
  // most rows for the bf16 dot-product backward kernels (panel_bf16.cpp)
  static const int64_t panel_max_m = env_int("LASS_SPARSE_CPU_PANEL_DX_MAX_M", 128);
  if (dy.scalar_type() == at::kBFloat16 && m_rows <= dp_max_m && has_avx512_bf16()) {
    dx_bf16dp(dy, w, bits, dx);
    return dx;
  }
  // 1 thread, best of 30 against dy @ W (decode -> BLAS in brackets), 2048x512 to 4096x4096:
  // M=16 0.86-1.27x (1.23-1.49x), M=64 1.04-1.20x (1.13-1.43x).
  if (dy.scalar_type() == at::kBFloat16 && m_rows <= panel_max_m &&
      has_avx512_bf16() && panel_gemm_enabled()) {
    dx_panel_bf16(dy, w, bits, dx);
    return dx;
  }
  // Column tiles of W ⊙ M: [N, kc] with kc a multiple of 32, so mask words stay aligned.
  int64_t kc = tile_extent(n, w.element_size(), k, 32, m_rows <= kWideTileMaxM ? 4 : 1);
  // Each tile's GEMM repacks all of dy: at least kMinTile columns (or a thread's share)
  // above the skinny range (as for dW's rows below).
  if (m_rows > kWideTileMaxM) kc = std::max(kc, min_tile(k, 32));
  const int64_t tiles = (k + kc - 1) / kc;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dy.scalar_type(), "masked_linear_dx", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const int32_t* bp = bits.data_ptr<int32_t>();
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: per worker thread
      auto buf = at::empty({n, kc}, w.options());
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * kc, cols = std::min(kc, k - k0);
        auto blk = buf.narrow(1, 0, cols);
        if (cols != kc) blk = at::empty({n, cols}, w.options());
        decode_block(wp, bp, k, 0, n, k0, cols, blk.data_ptr<scalar_t>());
        auto out = dx.narrow(1, k0, cols);
        at::mm_out(out, dy, blk);
      }
    });
  });
  return dx;
}

// rows [r0, r1) of dW (dtype of `dst`) = dy[:, r0:r1]ᵀ @ x, then ⊙ M (or += when accumulate).
static void dw_tiles(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits,
                     at::Tensor& dst, bool accumulate) {
  const int64_t n = dy.size(1), k = x.size(1);
  int64_t tn = tile_extent(k, 4, n, 16, dy.size(0) <= kWideTileMaxM ? 4 : 1);
  // Each tile's GEMM packs all of x again (M x K): with few rows per tile (32 at K = 4096) that
  // repacking cost 1.37-1.47x dense dW at M=512 bf16 4096x4096 (2 threads, busy machine);
  // at least kMinTile rows (or a thread's share) made it 1.00-1.08x. The mask epilogue then
  // works on a tile larger than L2, which costs far less than the GEMM.
  if (dy.size(0) > kWideTileMaxM) tn = std::max(tn, min_tile(n, 16));
  const int64_t tiles = (n + tn - 1) / tn;
  const int32_t* bp = bits.data_ptr<int32_t>();
  const int64_t nw = num_words(k);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dst.scalar_type(), "masked_linear_dw", [&] {
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: per worker thread
      at::Tensor tmp;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tn, r1 = std::min(n, r0 + tn);
        auto g = dy.narrow(1, r0, r1 - r0).t();
        auto rows = dst.narrow(0, r0, r1 - r0);
        scalar_t* base = rows.data_ptr<scalar_t>();
        if (!accumulate) {
          at::mm_out(rows, g, x);
          for (int64_t r = r0; r < r1; ++r)  // mask epilogue, in place while cache-hot
            masked_copy(base + (r - r0) * k, bp + r * nw, k, base + (r - r0) * k);
        } else {
          if (!tmp.defined()) tmp = at::empty({tn, k}, dst.options());
          auto part = tmp.narrow(0, 0, r1 - r0);
          at::mm_out(part, g, x);
          const scalar_t* pp = part.data_ptr<scalar_t>();
          for (int64_t r = r0; r < r1; ++r)
            masked_add(pp + (r - r0) * k, bp + r * nw, k, base + (r - r0) * k);
        }
      }
    });
  });
}

// grad_out [M, N] and x [M, K] (contiguous, floating, CPU) and bits int32[N, ceil(K/32)].
static void check_dw_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits,
                          const char* op) {
  check_float_2d(dy, op, "grad_out");
  check_float_2d(x, op, "x");
  LASS_CHECK(dy.size(0) == x.size(0), op, ": grad_out [M, N] and x [M, K] must have the same M, "
              "got ", dy.sizes(), " and ", x.sizes());
  check_bits(bits, {dy.size(1)}, x.size(1), op);
}

at::Tensor masked_linear_dw(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dw_args(dy, x, bits, "masked_linear_dw");
  LASS_CHECK(dy.scalar_type() == x.scalar_type(),
              "masked_linear_dw: grad_out and x dtypes differ (", dy.scalar_type(), ", ",
              x.scalar_type(), ")");
  auto dw = at::empty({dy.size(1), x.size(1)}, x.options());
  if (dw.numel() == 0) return dw;
  if (x.size(0) == 0) return dw.zero_();
  // Against dyᵀ x, 2 threads, K <= 2048 (BLAS + mask pass in brackets): M=4 0.51-0.85x
  // (1.38-1.56x), M=8 0.95-1.15x (1.39-1.66x), M=16 0.86-1.00x (1.26-1.33x), M=64 0.85-0.98x;
  // at K = 4096 worse (M=16 1.25x against 1.05x: a 32 MB result, page faults on both sides).
  static const int64_t panel_max_m = env_int("LASS_SPARSE_CPU_PANEL_DW_MAX_M", 128);
  if (x.scalar_type() == at::kBFloat16 && x.size(0) <= panel_max_m && x.size(1) <= 2048 &&
      has_avx512_bf16() && panel_gemm_enabled()) {
    dw_panel_bf16(dy, x, bits, dw);
    return dw;
  }
  dw_tiles(dy, x, bits, dw, false);
  return dw;
}

void masked_linear_dw_accumulate_(at::Tensor grad, const at::Tensor& dy, const at::Tensor& x,
                                  const at::Tensor& bits) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dw_args(dy, x, bits, "masked_linear_dw_accumulate_");
  check_float_2d(grad, "masked_linear_dw_accumulate_", "grad");
  LASS_CHECK(grad.size(0) == dy.size(1) && grad.size(1) == x.size(1),
              "masked_linear_dw_accumulate_: grad must be [N=", dy.size(1), ", K=", x.size(1),
              "], got ", grad.sizes());
  if (grad.numel() == 0 || x.size(0) == 0) return;
  // Accumulate in grad's dtype (fp32 master grads for bf16 activations).
  auto dy_c = dy.to(grad.scalar_type()).contiguous();
  auto x_c = x.to(grad.scalar_type()).contiguous();
  dw_tiles(dy_c, x_c, bits, grad, true);
}

// masked_linear with its gradient in C++ (forward, dx, dW and the bias sum without a Python
// autograd node): the eager CPU path of lass_sparse.masked_linear when gradients are needed.
// x is 2-D [M, K]; the same kernels as the op, so the same results.
struct MaskedLinearFn : public torch::autograd::Function<MaskedLinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w, const at::Tensor& bits,
                            const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({x, w, bits});
    ctx->saved_data["has_bias"] = bias.has_value();
    return masked_linear(x, w, bits, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // dx and dW come from kernels, not from differentiable ops: refuse a graph of the gradient
    // rather than return one that silently ends here.
    LASS_CHECK(!at::GradMode::is_enabled(),
                "masked_linear: double backward (create_graph=True) is not supported");
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto& bits = saved[2];
    const auto dy = grads[0].contiguous();
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) dx = masked_linear_dx(dy, w, bits);
    if (ctx->needs_input_grad(1)) dw = masked_linear_dw(dy, x, bits);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) db = dy.sum(0);
    return {dx, dw, at::Tensor(), db};
  }
};

at::Tensor masked_linear_autograd(const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& bits, const c10::optional<at::Tensor>& bias) {
  return MaskedLinearFn::apply(x, w, bits, bias);
}

// ---- entries under the public names (entry.h): the op's normalisation (x [..., K] as rows,
// contiguous inputs), then the kernel, or the op's Python body

static at::Tensor masked_linear_op(const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& bits,
                                   const c10::optional<at::Tensor>& bias) {
  static const auto registry =
      registry_overload<decltype(masked_linear_op)>("lass_sparse::masked_linear");
  return run_or_defer(
      registry,
      [&] {
        // below autograd: the [..., N] result is a plain tensor, not a view (in-place ops on
        // it work under autograd, as after F.linear)
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const auto b = contiguous(bias);
        if (x.dim() == 2) return masked_linear(x.contiguous(), w.contiguous(), bits.contiguous(), b);
        LASS_CHECK(x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1),
                    "masked_linear: x must be [..., K] to match weight [N, K]");
        int64_t m_rows = 1;  // the product of the leading sizes (K may be 0)
        for (int64_t d = 0; d + 1 < x.dim(); ++d) m_rows *= x.size(d);
        auto y = masked_linear(x.reshape({m_rows, w.size(1)}).contiguous(), w.contiguous(),
                               bits.contiguous(), b);
        auto sizes = x.sizes().vec();
        sizes.back() = w.size(0);
        return y.view(sizes);
      },
      x, w, bits, bias);
}

static at::Tensor segmented_masked_linear_op(const at::Tensor& x, const at::Tensor& w,
                                             const at::Tensor& bits_bank,
                                             const at::Tensor& seg_offsets,
                                             const at::Tensor& seg_pair,
                                             const c10::optional<at::Tensor>& bias) {
  static const auto registry = registry_overload<decltype(segmented_masked_linear_op)>(
      "lass_sparse::segmented_masked_linear");
  return run_or_defer(
      registry,
      [&] {
        return segmented_masked_linear(x.contiguous(), w.contiguous(), bits_bank.contiguous(),
                                       seg_offsets.contiguous(), seg_pair.contiguous(),
                                       contiguous(bias));
      },
      x, w, bits_bank, seg_offsets, seg_pair, bias);
}

static at::Tensor masked_linear_dx_op(const at::Tensor& dy, const at::Tensor& w,
                                      const at::Tensor& bits) {
  static const auto registry =
      registry_overload<decltype(masked_linear_dx_op)>("lass_sparse::masked_linear_dx");
  return run_or_defer(
      registry,
      [&] { return masked_linear_dx(dy.contiguous(), w.contiguous(), bits.contiguous()); }, dy,
      w, bits);
}

static at::Tensor masked_linear_dw_op(const at::Tensor& dy, const at::Tensor& x,
                                      const at::Tensor& bits) {
  static const auto registry =
      registry_overload<decltype(masked_linear_dw_op)>("lass_sparse::masked_linear_dw");
  return run_or_defer(
      registry,
      [&] { return masked_linear_dw(dy.contiguous(), x.contiguous(), bits.contiguous()); }, dy,
      x, bits);
}

static void masked_linear_dw_accumulate_op(const at::Tensor& grad, const at::Tensor& dy,
                                           const at::Tensor& x, const at::Tensor& bits) {
  static const auto registry = registry_overload<decltype(masked_linear_dw_accumulate_op)>(
      "lass_sparse::masked_linear_dw_accumulate_");
  run_or_defer(
      registry,
      [&] {
        // the op takes grad float32 or x's dtype; the kernel accumulates in grad's dtype
        LASS_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == x.scalar_type(),
                    "masked_linear_dw_accumulate_: grad must be float32 or x's dtype");
        LASS_CHECK(dy.scalar_type() == x.scalar_type(),
                    "masked_linear_dw_accumulate_: grad_out and x must share a dtype");
        masked_linear_dw_accumulate_(grad, dy.contiguous(), x.contiguous(), bits.contiguous());
      },
      grad, dy, x, bits);
}

}  // namespace lass_sparse_cpu

TORCH_LIBRARY_IMPL(lass_sparse_cpu, CompositeImplicitAutograd, m) {
  m.impl("masked_linear_autograd", &lass_sparse_cpu::masked_linear_autograd);
}

TORCH_LIBRARY_IMPL(lass_sparse, CPU, m) {
  m.impl("masked_linear", &lass_sparse_cpu::masked_linear_op);
  m.impl("segmented_masked_linear", &lass_sparse_cpu::segmented_masked_linear_op);
  m.impl("masked_linear_dx", &lass_sparse_cpu::masked_linear_dx_op);
  m.impl("masked_linear_dw", &lass_sparse_cpu::masked_linear_dw_op);
  m.impl("masked_linear_dw_accumulate_", &lass_sparse_cpu::masked_linear_dw_accumulate_op);
}
