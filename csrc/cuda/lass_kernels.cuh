// lass_sparse CUDA kernels: torch-free (raw pointers, sizes, a stream), so that `nvcc -c` checks
// them on machines without a GPU and cupy (NVRTC) can compile the same source at run time.
//
// Packed mask format: bits[row, w] bit j (LSB first) = mask[row, 32*w + j]; padding bits are 0.
// Kernels with C linkage (extern "C") are the ones cupy looks up by name. Structs, dtype codes and
// limits shared with the binding and the cupy loader are in lass_abi.h.
#pragma once

#include "lass_abi.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lass {

// Host and device: the small-M backward bodies below also run on the CPU (the tests' emulator).
#define LASS_HD __host__ __device__ __forceinline__

LASS_HD float to_float(float v) { return v; }
LASS_HD float to_float(__half v) { return __half2float(v); }
LASS_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> LASS_HD T from_float(float v);
template <> LASS_HD float from_float<float>(float v) { return v; }
template <> LASS_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> LASS_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
// T -> O rounded to nearest through fp32 (exact for widening), the identity for one type (a
// struct, not <type_traits>: NVRTC compiles this header too).
template <typename O, typename T> struct Cast {
  static LASS_HD O run(T v) { return from_float<O>(to_float(v)); }
};
template <typename T> struct Cast<T, T> {
  static LASS_HD T run(T v) { return v; }
};
template <typename O, typename T> LASS_HD O cast_to(T v) { return Cast<O, T>::run(v); }

// A 2-D array of accumulators (registers, when its indices are compile-time) set to 0.
template <int R, int C> LASS_HD void zero2(float (&a)[R][C]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) a[r][c] = 0.f;
}

// ------------------------------------------------------------------------- vector accesses

template <int BYTES> struct RawVec;
template <> struct RawVec<16> { using type = uint4; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<4> { using type = unsigned int; };

// Evict-first loads on the device (streamed once), plain ones in the emulator.
template <typename V> LASS_HD V ld_stream(const V* p) {
#ifdef __CUDA_ARCH__
  return __ldcs(p);
#else
  return *p;
#endif
}

// VEC elements of p into e[] (their raw bits): one vector load when `vec` (then all VEC are in
// range and p is aligned to the vector), else `avail` scalar loads and zeros.
template <typename T, int VEC, bool STREAM>
LASS_HD void load_cols(const T* p, bool vec, int avail, T* e) {
  constexpr int B = VEC * (int)sizeof(T);
  if constexpr (B == 16 || B == 8 || B == 4 || B == 32) {
    if (vec) {
      constexpr int CH = B == 32 ? 16 : B;  // 32 bytes: two 16-byte loads
      using V = typename RawVec<CH>::type;
      V raw[B / CH];
#pragma unroll
      for (int i = 0; i < B / CH; ++i)
        raw[i] = STREAM ? ld_stream(reinterpret_cast<const V*>(p) + i)
                        : reinterpret_cast<const V*>(p)[i];
      const T* r = reinterpret_cast<const T*>(raw);
#pragma unroll
      for (int j = 0; j < VEC; ++j) e[j] = r[j];
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) e[j] = j < avail ? p[j] : from_float<T>(0.f);
}

template <typename T, int VEC>
LASS_HD void store_cols(T* p, bool vec, int avail, const T* e) {
  constexpr int B = VEC * (int)sizeof(T);
  if constexpr (B == 16 || B == 8 || B == 4 || B == 32) {
    if (vec) {
      constexpr int CH = B == 32 ? 16 : B;
      using V = typename RawVec<CH>::type;
      V raw[B / CH];
      T* r = reinterpret_cast<T*>(raw);
#pragma unroll
      for (int j = 0; j < VEC; ++j) r[j] = e[j];
#pragma unroll
      for (int i = 0; i < B / CH; ++i) reinterpret_cast<V*>(p)[i] = raw[i];
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    if (j < avail) p[j] = e[j];
}


// ------------------------------------------------------------------------------ pack / unpack

// One thread per output word: 32 mask bytes -> one int32.
LASS_HD void pack_word(const bool* mask, int32_t* bits, int64_t rows, int64_t k, int64_t nw,
                       int64_t idx) {
  if (idx >= rows * nw) return;
  const int64_t r = idx / nw, w = idx % nw;
  const bool* src = mask + r * k + w * 32;
  const int n = (int)min((int64_t)32, k - w * 32);
  uint32_t word = 0;
  for (int j = 0; j < n; ++j) word |= (uint32_t)(src[j] ? 1u : 0u) << j;
  bits[idx] = (int32_t)word;
}

// |w| > threshold, packed (magnitude rule; the threshold is the kth value, found on device).
template <typename T>
LASS_HD void magnitude_word(const T* w, float thr, int32_t* bits, int64_t rows, int64_t k,
                            int64_t nw, int64_t idx) {
  if (idx >= rows * nw) return;
  const int64_t r = idx / nw, wi = idx % nw;
  const T* src = w + r * k + wi * 32;
  const int n = (int)min((int64_t)32, k - wi * 32);
  uint32_t word = 0;
  for (int j = 0; j < n; ++j) word |= (uint32_t)(fabsf(to_float(src[j])) > thr) << j;
  bits[idx] = (int32_t)word;
}

// ---------------------------------------------------------------------------------- apply mask
// out = src ⊙ M (out may be src: in place), or with `accumulate` out += src ⊙ M in fp32, where
// entries off the mask keep their exact bits. A select, never a product: NaN/Inf off the mask
// never reaches out. One thread per 8 consecutive elements of a row (the 4 threads of a
// 32-element group share one mask word); with `vec` (k % 8 == 0, 16-byte aligned src and out)
// they move as 128-bit accesses. `out` may have another dtype than `src` (masked_cast: the
// mask applied in the pass that casts W, rounded to nearest as torch's casts).

template <typename T, typename O = T>
LASS_HD void apply_mask_octet(const T* src, const int32_t* bits, O* out, int64_t rows,
                              int64_t k, int64_t nw, int accumulate, int vec, int64_t idx) {
  const int64_t per_row = (k + 7) / 8;
  if (idx >= rows * per_row) return;
  const int64_t r = idx / per_row, c0 = (idx % per_row) * 8;
  const int n = (int)min((int64_t)8, k - c0);
  const uint32_t byte = ((uint32_t)bits[r * nw + c0 / 32] >> (c0 % 32)) & 0xffu;
  const int64_t at = r * k + c0;
  T v[8];
  O o[8];
  load_cols<T, 8, false>(src + at, vec != 0, n, v);
  if (accumulate) load_cols<O, 8, false>(out + at, vec != 0, n, o);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const bool keep = (byte >> j) & 1u;
    if (accumulate)
      o[j] = keep ? from_float<O>(to_float(o[j]) + to_float(v[j])) : o[j];
    else
      o[j] = keep ? cast_to<O>(v[j]) : from_float<O>(0.f);
  }
  store_cols<O, 8>(out + at, vec != 0, n, o);
}

// ------------------------------------------------------------------------------- decode GEMV
// y[m, n] = sum_k x[m, k] * w[n, k] * bit(n, k) + b[n] for M <= 16 (the translate path).
// One warp per output row; each lane reads 8 consecutive weights per step (one 128-bit load for
// 16-bit types), the 4 lanes of a 32-weight group share one mask word; fp32 accumulation.

template <typename T>
__device__ __forceinline__ void decode_gemv_row(const T* __restrict__ x,
                                                const T* __restrict__ w,
                                                const int32_t* __restrict__ bits,
                                                const T* __restrict__ bias, T* __restrict__ y,
                                                int m_rows, int64_t n, int64_t k, int64_t nw,
                                                int64_t row, int lane) {
  if (row >= n) return;
  float acc[kGemvMaxM];
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) acc[m] = 0.f;
  const T* wr = w + row * k;
  const int32_t* br = bits + row * nw;
  const bool vec = (k % 8 == 0) && sizeof(T) == 2 && ((uintptr_t)w % 16 == 0);
  for (int64_t k0 = (int64_t)lane * 8; k0 < k; k0 += 32 * 8) {
    const uint32_t word = (uint32_t)br[k0 / 32] >> (k0 % 32);  // 8 bits for this lane
    float wv[8];
    if (vec && k0 + 8 <= k) {
      const uint4 raw = *reinterpret_cast<const uint4*>(wr + k0);
      const T* p = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) wv[j] = ((word >> j) & 1u) ? to_float(p[j]) : 0.f;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        wv[j] = (k0 + j < k && ((word >> j) & 1u)) ? to_float(wr[k0 + j]) : 0.f;
    }
    for (int m = 0; m < m_rows; ++m) {
      const T* xr = x + (int64_t)m * k + k0;
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) s += (k0 + j < k) ? wv[j] * to_float(xr[j]) : 0.f;
      acc[m] += s;
    }
  }
  for (int m = 0; m < m_rows; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) {
      if (bias) v += to_float(bias[row]);
      y[(int64_t)m * n + row] = from_float<T>(v);
    }
  }
}

// ---------------------------------------------------------------------------- decode GEMV v2
// Issue 29's decode kernel (selected by LASS_SPARSE_CUDA_GEMV=v2; v1 above stays the default):
// - x[0:M, chunk] is staged once per block in shared memory with 128-bit loads, and every warp
//   reads it from there (v1: every warp re-reads x from global memory, 16 bits at a time);
// - W and the mask words are streamed once with evict-first loads (ld.global.cs: __ldcs);
// - each warp computes R output rows (R independent 16-byte weight loads in flight per lane),
//   each lane 8 weights (one mask byte) per step, the K loop unrolled by 2;
// - MT (a compile-time bound >= M) keeps the fp32 accumulators acc[R][MT] in registers.
// Its phases are host+device code (below, after the helpers they share with the small-M
// kernels): the tests' emulator runs them as a block would, barriers between the phases.

// ------------------------------------------------------------------- small-M backward (M <= 64)
// Issue 29: the backward of the decode / small-batch regime in one CUDA pass each, no Triton:
//   dx[m, c] = sum_n dy[m, n] * (bit(n, c) ? W[n, c] : 0)
//   dW[r, c] = bit(r, c) ? sum_m dy[m, r] * x[m, c] : 0     (accumulating: grad[r, c] += that on
//              the mask, entries off the mask keep their exact bits; the mask in the "epilogue")
// Each thread owns VEC consecutive columns (one VEC * sizeof(T)-byte access per row when `vec`),
// with MT fp32 accumulator rows in registers (M rows in chunks of kSmallBwdChunk = MT = 16 above
// 16); a select, so NaN/Inf off the mask never enters. W (dx, once per chunk) and dW are
// streamed; dy and x are a few KB and read through the cache (a warp's lanes read the same dy
// element: one broadcast). No shared memory and no warp shuffles:
// the bodies are host+device and take their block/thread position as arguments, so the tests run
// them on the CPU, every position of the launch grid in turn (tests/ops/test_cuda_emulated.py).
// dx splits N over blockIdx.y (lass_small_dx_splits): one split writes dx, several write fp32
// partials that small_dx_sum adds in split order (deterministic, no atomics).

// The rows bound of an instantiation for m rows (1, 2, 4, 8 or 16) and the columns per thread:
// 16-byte runs of T up to 8 rows, 8-byte runs above (the accumulators stay at <= 64 floats).
LASS_HD int small_mt(int m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16; }
LASS_HD constexpr int small_vec_elems(int mt, int elem_bytes) {
  return (mt <= 8 ? 16 : 8) / elem_bytes;
}
template <typename T, int MT> LASS_HD constexpr int small_vec() {
  return small_vec_elems(MT, (int)sizeof(T));
}
// Weight rows per dW thread: kSmallDwRows, half that where x comes in chunks (their sums stay
// in registers across the chunks).
template <int MT> LASS_HD constexpr int small_dw_rows() {
  return MT < kSmallBwdChunk ? kSmallDwRows : kSmallDwRows / 2;
}

// dx for columns [c0, c0 + VEC) over the weight rows of split `split` of `splits`.
template <typename T, int MT, int VEC>
LASS_HD void small_dx_thread(const T* __restrict__ dy, const T* __restrict__ w,
                             const int32_t* __restrict__ bits, T* __restrict__ dx,
                             float* __restrict__ ws, int m_rows, int64_t n, int64_t k, int splits,
                             bool vec, int64_t block, int64_t split, int t0, int thread) {
  const int64_t c0 = (block * kSmallDxThreads + thread) * VEC;
  if (c0 >= k) return;
  const int64_t nw = (k + 31) / 32, chunk = (n + splits - 1) / splits;
  const int64_t lo = split * chunk, hi = lo + chunk < n ? lo + chunk : n;
  const int avail = k - c0 < VEC ? (int)(k - c0) : VEC;
  const int rows = m_rows - t0 < MT ? m_rows - t0 : MT;  // this chunk's rows of dy / dx
  dy += (int64_t)t0 * n;
  dx += (int64_t)t0 * k;
  float acc[MT][VEC];
  zero2(acc);
  for (int64_t r = lo; r < hi; ++r) {
    const uint32_t word = (uint32_t)bits[r * nw + c0 / 32] >> (c0 % 32);  // VEC | 32
    T e[VEC];
    load_cols<T, VEC, true>(w + r * k + c0, vec, avail, e);
    float wf[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) wf[j] = ((word >> j) & 1u) ? to_float(e[j]) : 0.f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < rows) {
        const float d = to_float(dy[(int64_t)m * n + r]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[m][j] = fmaf(d, wf[j], acc[m][j]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < rows) {
      if (splits == 1) {
        T o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = from_float<T>(acc[m][j]);
        store_cols<T, VEC>(dx + (int64_t)m * k + c0, vec, avail, o);
      } else {
        store_cols<float, VEC>(ws + (split * m_rows + t0 + m) * k + c0, vec, avail, acc[m]);
      }
    }
  }
}

// The kernels' grid positions: dx blocks (column block x row chunk, split) of
// kSmallDxThreads threads, the chunks of kSmallBwdChunk rows of one column block adjacent (they
// read the same W columns: L2); dW blocks (row block, column block) of (kSmallDwCols,
// kSmallDwGroups) threads (weight rows on grid x, which takes 2^31 - 1 blocks).
template <typename T, int MT>
LASS_HD void small_dx_at(const T* dy, const T* w, const int32_t* bits, T* dx, float* ws,
                         int m_rows, int64_t n, int64_t k, int splits, int chunks, bool vec,
                         uint3 block, uint3 thread) {
  small_dx_thread<T, MT, small_vec<T, MT>()>(dy, w, bits, dx, ws, m_rows, n, k, splits, vec,
                                             block.x / chunks, block.y,
                                             (int)(block.x % chunks) * kSmallBwdChunk,
                                             (int)thread.x);
}

// dx[i] = sum of the splits' partials ws[s, i] in split order, for element i of dx [m, k].
template <typename T>
LASS_HD void small_dx_sum(const float* __restrict__ ws, T* __restrict__ dx, int splits,
                          int64_t total, int64_t i) {
  if (i >= total) return;
  float s = 0.f;
  for (int p = 0; p < splits; ++p) s += ws[p * total + i];
  dx[i] = from_float<T>(s);
}

// dW (into out of type O: T, or float when accumulating) for columns [c0, c0 + VEC) of
// small_dw_rows<MT>() weight rows. Up to 8 rows of x (MT <= 8): x's columns stay in registers
// across the weight rows. More (MT = 16, up to kSmallBwdMaxM rows): x in chunks of kSmallBwdChunk rows,
// the weight rows' sums in registers across the chunks (one rounding at the end, as before).
template <typename O, int VEC>
LASS_HD void small_dw_write(O* __restrict__ o, const float* acc, uint32_t word, bool accumulate,
                            bool vec_out, int avail) {
  O v[VEC];
  if (accumulate) {
    load_cols<O, VEC, false>(o, vec_out, avail, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if ((word >> j) & 1u) v[j] = from_float<O>(to_float(v[j]) + acc[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = from_float<O>(((word >> j) & 1u) ? acc[j] : 0.f);
  }
  store_cols<O, VEC>(o, vec_out, avail, v);
}

// x[t0 .. t0 + MT) columns [c0, c0 + VEC) as floats (zeros past m_rows).
template <typename T, int MT, int VEC>
LASS_HD void small_x_cols(const T* __restrict__ x, int m_rows, int t0, int64_t k, int64_t c0,
                          bool vec, int avail, float (*xf)[VEC]) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    T e[VEC];
    if (t0 + m < m_rows) {
      load_cols<T, VEC, false>(x + (int64_t)(t0 + m) * k + c0, vec, avail, e);
#pragma unroll
      for (int j = 0; j < VEC; ++j) xf[m][j] = to_float(e[j]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) xf[m][j] = 0.f;
    }
  }
}

template <typename T, typename O, int MT, int VEC>
LASS_HD void small_dw_thread(const T* __restrict__ dy, const T* __restrict__ x,
                             const int32_t* __restrict__ bits, O* __restrict__ out, int m_rows,
                             int64_t n, int64_t k, bool accumulate, bool vec, bool vec_out,
                             int64_t block_x, int64_t block_y, int tx, int ty) {
  const int64_t c0 = (block_x * kSmallDwCols + tx) * VEC;
  constexpr int ROWS = small_dw_rows<MT>();
  const int64_t r0 = (block_y * kSmallDwGroups + ty) * ROWS;
  if (c0 >= k || r0 >= n) return;
  const int64_t nw = (k + 31) / 32;
  const int avail = k - c0 < VEC ? (int)(k - c0) : VEC;
  float xf[MT][VEC];
  if constexpr (MT < kSmallBwdChunk) {  // all rows of x at once
    small_x_cols<T, MT, VEC>(x, m_rows, 0, k, c0, vec, avail, xf);
    for (int i = 0; i < ROWS; ++i) {
      const int64_t r = r0 + i;
      if (r >= n) break;
      float acc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < m_rows) {
          const float d = to_float(dy[(int64_t)m * n + r]);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] = fmaf(d, xf[m][j], acc[j]);
        }
      }
      const uint32_t word = (uint32_t)bits[r * nw + c0 / 32] >> (c0 % 32);
      small_dw_write<O, VEC>(out + r * k + c0, acc, word, accumulate, vec_out, avail);
    }
  } else {  // chunks of x rows; every weight row's sums kept across them
    float acc[ROWS][VEC];
    zero2(acc);
    for (int t0 = 0; t0 < m_rows; t0 += MT) {
      small_x_cols<T, MT, VEC>(x, m_rows, t0, k, c0, vec, avail, xf);
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        const int64_t r = r0 + i;
        if (r < n) {
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if (t0 + m < m_rows) {
              const float d = to_float(dy[(int64_t)(t0 + m) * n + r]);
#pragma unroll
              for (int j = 0; j < VEC; ++j) acc[i][j] = fmaf(d, xf[m][j], acc[i][j]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int64_t r = r0 + i;
      if (r < n) {
        const uint32_t word = (uint32_t)bits[r * nw + c0 / 32] >> (c0 % 32);
        small_dw_write<O, VEC>(out + r * k + c0, acc[i], word, accumulate, vec_out, avail);
      }
    }
  }
}

template <typename T, typename O, int MT>
LASS_HD void small_dw_at(const T* dy, const T* x, const int32_t* bits, O* out, int m_rows,
                         int64_t n, int64_t k, bool accumulate, bool vec, bool vec_out,
                         uint3 block, uint3 thread) {
  small_dw_thread<T, O, MT, small_vec<T, MT>()>(dy, x, bits, out, m_rows, n, k, accumulate, vec,
                                                vec_out, block.y, block.x, (int)thread.x,
                                                (int)thread.y);
}

// ------------------------------------------------------------------ segmented decode GEMV
// Issue 29 (item 5, for decoding): the rows of a mixed-pair batch, each under its own pair's
// mask, in one launch that streams W once per 16-row chunk (the server's decode step: a few
// rows per pair). One warp per output row n; each lane takes 8 consecutive weights per step,
// selects them by the mask word of each row's pair (loaded again only where the pair changes
// from one row to the next: rows are grouped by segment) and adds their products with the row
// of x into the row's fp32 accumulator; the lanes' partial sums meet in a butterfly of shuffles.
// The per-lane part and the final store are host+device code: the tests' emulator runs them for
// all 32 lanes and replays the butterfly (tests/ops/test_cuda_emulated.py).

// Pairs of rows [t0, t0 + MT) of the table (-1 for rows no segment covers), clamped: offsets
// into [0, t_rows] and non-decreasing, ids into [0, pairs) — nothing outside the tensors. No
// table (offs null): every row is pair 0 (the single-pair GEMV v3).
template <int MT>
LASS_HD void seg_rows_pairs(const int64_t* __restrict__ offs, const int64_t* __restrict__ ids,
                            int segs, int pairs, int t_rows, int t0, int* pr) {
#pragma unroll
  for (int t = 0; t < MT; ++t) pr[t] = offs ? -1 : 0;
  if (!offs) return;
  int64_t lo = offs[0] < 0 ? 0 : offs[0] > t_rows ? t_rows : offs[0];
  for (int s = 0; s < segs; ++s) {
    int64_t hi = offs[s + 1] > t_rows ? t_rows : offs[s + 1];
    if (hi < lo) hi = lo;
    const int64_t id = ids[s];
    const int p = id < 0 ? 0 : id >= pairs ? pairs - 1 : (int)id;
#pragma unroll
    for (int t = 0; t < MT; ++t)
      if (t0 + t >= lo && t0 + t < hi) pr[t] = p;
    lo = hi;
  }
}

// Lane `lane`'s partial sums acc[t] for output row `row` and x rows t0 + t (t < MT, < t_rows).
template <typename T, int MT>
LASS_HD void seg_gemv_lane(const T* __restrict__ x, const T* __restrict__ w,
                           const int32_t* __restrict__ bank, const int* pr, int t_rows, int t0,
                           int64_t n, int64_t k, bool vec, int64_t row, int lane, float* acc) {
  const int64_t nw = (k + 31) / 32;
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t] = 0.f;
  const T* wr = w + row * k;
  for (int64_t k0 = (int64_t)lane * 8; k0 < k; k0 += 32 * 8) {
    const int avail = k - k0 < 8 ? (int)(k - k0) : 8;
    const bool full = vec && avail == 8;
    T e[8];
    load_cols<T, 8, false>(wr + k0, full, avail, e);
    float wv[8], wm[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) wv[j] = to_float(e[j]);
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      if (t0 + t < t_rows) {
        if (t == 0 || pr[t] != pr[t - 1]) {  // a new segment: its pair's mask word
          const uint32_t word =
              pr[t] < 0 ? 0u
                        : (uint32_t)bank[((int64_t)pr[t] * n + row) * nw + k0 / 32] >> (k0 % 32);
#pragma unroll
          for (int j = 0; j < 8; ++j) wm[j] = ((word >> j) & 1u) ? wv[j] : 0.f;
        }
        T xe[8];
        load_cols<T, 8, false>(x + (int64_t)(t0 + t) * k + k0, full, avail, xe);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) sum = fmaf(wm[j], to_float(xe[j]), sum);
        acc[t] += sum;
      }
    }
  }
}

// Lane 0's store of the reduced sums (plus the bias).
template <typename T, int MT>
LASS_HD void seg_gemv_store(const float* acc, const T* __restrict__ bias, T* __restrict__ y,
                            int t_rows, int t0, int64_t n, int64_t row) {
  const float b = bias ? to_float(bias[row]) : 0.f;
#pragma unroll
  for (int t = 0; t < MT; ++t)
    if (t0 + t < t_rows) y[(int64_t)(t0 + t) * n + row] = from_float<T>(acc[t] + b);
}

// The launch grid's blocks: chunk c of the x rows (kGemvMaxM rows each) fastest, so the
// chunks of the same output rows run side by side and share W's rows in L2.
LASS_HD void seg_gemv_block(int64_t block, int chunks, int64_t* row_block, int* chunk) {
  *chunk = (int)(block % chunks);
  *row_block = block / chunks;
}

// Decode GEMV v2's phases (see its description above). Needs k % 8 == 0 and 16-byte aligned x
// and w (the launcher falls back to v1 otherwise); rows of the x chunk are kc elements apart in
// shared memory (kc: a multiple of 256).
// Phase 1 (every thread of the block, between barriers): x[0:M, c0:c0+len] into shared memory.
template <typename T>
LASS_HD void gemv2_stage(const T* __restrict__ x, T* __restrict__ xs, int m_rows, int64_t k,
                         int64_t c0, int len, int kc, int tid, int nthreads) {
  constexpr int V = 16 / (int)sizeof(T);  // elements per 16-byte vector: 8 (16-bit) or 4 (fp32)
  const int vpr = len / V;                // 16-byte vectors per x row in this chunk
  for (int i = tid; i < m_rows * vpr; i += nthreads) {
    const int m = i / vpr, v = i % vpr;
    const uint4* src = reinterpret_cast<const uint4*>(x + (int64_t)m * k + c0) + v;
#ifdef __CUDA_ARCH__
    reinterpret_cast<uint4*>(xs + (int64_t)m * kc)[v] = __ldg(src);
#else
    reinterpret_cast<uint4*>(xs + (int64_t)m * kc)[v] = *src;
#endif
  }
}

// Phase 2 (each lane of each warp): the chunk's contribution to acc[R][MT], the lane's partial
// sums for output rows row0 .. row0 + R - 1.
template <typename T, int MT, int R>
LASS_HD void gemv2_chunk(const T* __restrict__ xs, const T* __restrict__ w,
                         const int32_t* __restrict__ bits, int m_rows, int64_t n, int64_t k,
                         int64_t nw, int kc, int64_t c0, int len, int64_t row0, int lane,
                         float (*acc)[MT]) {
  constexpr int V = 16 / (int)sizeof(T);
  constexpr int E = 8;         // weights per lane per step: one mask byte
  constexpr int NV = E / V;    // 16-byte loads per row per step: 1 or 2
#pragma unroll 2
  for (int j = lane * E; j < len; j += 32 * E) {
    const int64_t kk = c0 + j;
    uint4 wv[R][NV];
    uint32_t wd[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {  // R rows' loads issued before any use
      const int64_t row = row0 + r;
      if (row < n) {
        const uint4* p = reinterpret_cast<const uint4*>(w + row * k + kk);
#pragma unroll
        for (int v = 0; v < NV; ++v) wv[r][v] = ld_stream(p + v);
        wd[r] = (uint32_t)ld_stream(bits + row * nw + kk / 32) >> (kk % 32);
      } else {
#pragma unroll
        for (int v = 0; v < NV; ++v) wv[r][v] = make_uint4(0u, 0u, 0u, 0u);
        wd[r] = 0u;
      }
    }
    float wf[R][E];  // masked weights as float: a select, so off-mask NaN/Inf never enter
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const T* pe = reinterpret_cast<const T*>(&wv[r][0]);
#pragma unroll
      for (int e = 0; e < E; ++e) wf[r][e] = ((wd[r] >> e) & 1u) ? to_float(pe[e]) : 0.f;
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < m_rows) {
        uint4 xv[NV];
#pragma unroll
        for (int v = 0; v < NV; ++v)
          xv[v] = reinterpret_cast<const uint4*>(xs + (int64_t)m * kc + j)[v];
        const T* px = reinterpret_cast<const T*>(&xv[0]);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float s = 0.f;
#pragma unroll
          for (int e = 0; e < E; ++e) s = fmaf(wf[r][e], to_float(px[e]), s);
          acc[r][m] += s;
        }
      }
    }
  }
}

// Phase 3 (lane 0, after the shuffle butterfly): y for the warp's rows, plus the bias.
template <typename T, int MT, int R>
LASS_HD void gemv2_store(float (*acc)[MT], const T* __restrict__ bias, T* __restrict__ y,
                         int m_rows, int64_t n, int64_t row0) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = row0 + r;
    if (row >= n) continue;
    const float b = bias ? to_float(bias[row]) : 0.f;  // once per row
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < m_rows) y[(int64_t)m * n + row] = from_float<T>(acc[r][m] + b);
  }
}

template <typename T, int MT, int R>
__device__ __forceinline__ void decode_gemv2(const T* __restrict__ x, const T* __restrict__ w,
                                             const int32_t* __restrict__ bits,
                                             const T* __restrict__ bias, T* __restrict__ y,
                                             int m_rows, int64_t n, int64_t k, int64_t nw,
                                             int kc) {
  extern __shared__ uint4 lass_gemv2_smem[];
  T* xs = reinterpret_cast<T*>(lass_gemv2_smem);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t row0 = ((int64_t)blockIdx.x * warps + warp) * R;
  float acc[R][MT];
  zero2(acc);
  for (int64_t c0 = 0; c0 < k; c0 += kc) {
    const int len = (int)min((int64_t)kc, k - c0);  // a multiple of 8
    __syncthreads();                                // the previous chunk is consumed
    gemv2_stage<T>(x, xs, m_rows, k, c0, len, kc, threadIdx.x, blockDim.x);
    __syncthreads();
    gemv2_chunk<T, MT, R>(xs, w, bits, m_rows, n, k, nw, kc, c0, len, row0, lane, acc);
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1)
        acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], off);
  if (lane == 0) gemv2_store<T, MT, R>(acc, bias, y, m_rows, n, row0);
}

// ------------------------------------------------------------------------------ masked AdamW
// Multi-tensor: one launch over a list of tensors described by a chunk table. Entries whose
// mask bit is 0 keep p, exp_avg and exp_avg_sq bit-for-bit (nothing is written).
// (AdamWTensor / AdamWArgs: lass_abi.h)
template <typename T>
LASS_HD void adamw_element(const AdamWTensor& t, const AdamWArgs& a, int64_t i) {
  if (t.bits) {
    const int64_t r = i / t.k, c = i % t.k;
    if (!(((uint32_t)t.bits[r * t.nw + c / 32] >> (c % 32)) & 1u)) return;
  }
  T* p = static_cast<T*>(t.p);
  const T* g = static_cast<const T*>(t.g);
  float grad = to_float(g[i]);
  if (a.maximize) grad = -grad;
  float param = to_float(p[i]);
  param -= a.lr * a.weight_decay * param;
  const float m = a.beta1 * t.m[i] + (1.f - a.beta1) * grad;
  const float v = a.beta2 * t.v[i] + (1.f - a.beta2) * grad * grad;
  t.m[i] = m;
  t.v[i] = v;
  const float denom = sqrtf(v / a.bc2) + a.eps;
  param -= a.lr * (m / a.bc1) / denom;
  p[i] = from_float<T>(param);
}

}  // namespace lass

// ------------------------------------------------------------------------------ entry points

// masked_cast: (W ⊙ M) of one dtype written as another (W fp32 <-> 16-bit).
#define LASS_MASK_CAST_KERNEL(SUFFIX, TI, TO)                                                 \
  extern "C" __global__ void lass_mask_cast_##SUFFIX(const TI* src, const int32_t* bits,     \
                                                     TO* out, int64_t rows, int64_t k,        \
                                                     int64_t nw, int vec) {                   \
    lass::apply_mask_octet<TI, TO>(src, bits, out, rows, k, nw, 0, vec,                       \
                                   (int64_t)blockIdx.x * blockDim.x + threadIdx.x);           \
  }
LASS_MASK_CAST_KERNEL(f32_bf16, float, __nv_bfloat16)
LASS_MASK_CAST_KERNEL(f32_f16, float, __half)
LASS_MASK_CAST_KERNEL(bf16_f32, __nv_bfloat16, float)
LASS_MASK_CAST_KERNEL(f16_f32, __half, float)
#undef LASS_MASK_CAST_KERNEL

extern "C" __global__ void lass_pack_mask(const bool* mask, int32_t* bits, int64_t rows,
                                          int64_t k, int64_t nw) {
  lass::pack_word(mask, bits, rows, k, nw, (int64_t)blockIdx.x * blockDim.x + threadIdx.x);
}

extern "C" __global__ void lass_unpack_mask(const int32_t* bits, bool* mask, int64_t rows,
                                            int64_t k, int64_t nw) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * k) return;
  const int64_t r = i / k, c = i % k;
  mask[i] = ((uint32_t)bits[r * nw + c / 32] >> (c % 32)) & 1u;
}

#define LASS_TYPED_KERNELS(SUFFIX, T)                                                         \
  extern "C" __global__ void lass_magnitude_pack_##SUFFIX(const T* w, float thr,              \
                                                          int32_t* bits, int64_t rows,        \
                                                          int64_t k, int64_t nw) {            \
    lass::magnitude_word<T>(w, thr, bits, rows, k, nw,                                        \
                            (int64_t)blockIdx.x * blockDim.x + threadIdx.x);                  \
  }                                                                                           \
  extern "C" __global__ void lass_apply_mask_##SUFFIX(const T* src, const int32_t* bits,     \
                                                      T* out, int64_t rows, int64_t k,        \
                                                      int64_t nw, int accumulate, int vec) {  \
    lass::apply_mask_octet<T>(src, bits, out, rows, k, nw, accumulate, vec,                   \
                              (int64_t)blockIdx.x * blockDim.x + threadIdx.x);                \
  }                                                                                           \
  extern "C" __global__ void lass_decode_gemv_##SUFFIX(const T* x, const T* w,                \
                                                       const int32_t* bits, const T* bias,    \
                                                       T* y, int m_rows, int64_t n,           \
                                                       int64_t k, int64_t nw) {               \
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;           \
    lass::decode_gemv_row<T>(x, w, bits, bias, y, m_rows, n, k, nw, row, threadIdx.x % 32);   \
  }                                                                                           \
  extern "C" __global__ void lass_masked_adamw_##SUFFIX(const lass::AdamWTensor* tensors,     \
                                                        const int32_t* chunk_tensor,          \
                                                        const int64_t* chunk_start,           \
                                                        int64_t chunk_size, float lr,         \
                                                        float beta1, float beta2, float eps,  \
                                                        float weight_decay, float bc1,        \
                                                        float bc2, int maximize) {            \
    const lass::AdamWArgs args{lr, beta1, beta2, eps, weight_decay, bc1, bc2, maximize};      \
    const lass::AdamWTensor t = tensors[chunk_tensor[blockIdx.x]];                            \
    const int64_t start = chunk_start[blockIdx.x];                                            \
    const int64_t end = min(t.numel, start + chunk_size);                                     \
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x)                           \
      lass::adamw_element<T>(t, args, i);                                                     \
  }

LASS_TYPED_KERNELS(f32, float)
LASS_TYPED_KERNELS(f16, __half)
LASS_TYPED_KERNELS(bf16, __nv_bfloat16)

// Decode GEMV v2: one extern "C" kernel per (dtype, MT, R), named
// lass_decode_gemv2_<sfx>_m<MT>_r<R> (the launcher and the cupy loader pick by M and N).
#define LASS_GEMV2_KERNEL(SUFFIX, T, MT, R)                                                   \
  extern "C" __global__ void __launch_bounds__(256)                                           \
      lass_decode_gemv2_##SUFFIX##_m##MT##_r##R(const T* x, const T* w, const int32_t* bits,  \
                                                const T* bias, T* y, int m_rows, int64_t n,   \
                                                int64_t k, int64_t nw, int kc) {              \
    lass::decode_gemv2<T, MT, R>(x, w, bits, bias, y, m_rows, n, k, nw, kc);                  \
  }
#define LASS_GEMV2_KERNELS(SUFFIX, T)                                                         \
  LASS_GEMV2_KERNEL(SUFFIX, T, 1, 2) LASS_GEMV2_KERNEL(SUFFIX, T, 1, 4)                       \
  LASS_GEMV2_KERNEL(SUFFIX, T, 2, 2) LASS_GEMV2_KERNEL(SUFFIX, T, 2, 4)                       \
  LASS_GEMV2_KERNEL(SUFFIX, T, 4, 2) LASS_GEMV2_KERNEL(SUFFIX, T, 4, 4)                       \
  LASS_GEMV2_KERNEL(SUFFIX, T, 8, 2) LASS_GEMV2_KERNEL(SUFFIX, T, 8, 4)                       \
  LASS_GEMV2_KERNEL(SUFFIX, T, 16, 2) LASS_GEMV2_KERNEL(SUFFIX, T, 16, 4)
LASS_GEMV2_KERNELS(f32, float)
LASS_GEMV2_KERNELS(f16, __half)
LASS_GEMV2_KERNELS(bf16, __nv_bfloat16)

// Small-M backward: templates (not extern "C": the torch binding launches them; cupy does not).
template <typename T, int MT>
__global__ void __launch_bounds__(lass::kSmallDxThreads)
    lass_small_dx(const T* dy, const T* w, const int32_t* bits, T* dx, float* ws, int m_rows,
                  int64_t n, int64_t k, int splits, int chunks, int vec) {
  lass::small_dx_at<T, MT>(dy, w, bits, dx, ws, m_rows, n, k, splits, chunks, vec != 0,
                           blockIdx, threadIdx);
}

template <typename T>
__global__ void lass_small_dx_sum(const float* ws, T* dx, int splits, int64_t total) {
  lass::small_dx_sum<T>(ws, dx, splits, total, (int64_t)blockIdx.x * blockDim.x + threadIdx.x);
}

template <typename T, typename O, int MT>
__global__ void __launch_bounds__(lass::kSmallDwCols * lass::kSmallDwGroups)
    lass_small_dw(const T* dy, const T* x, const int32_t* bits, O* out, int m_rows, int64_t n,
                  int64_t k, int accumulate, int vec, int vec_out) {
  lass::small_dw_at<T, O, MT>(dy, x, bits, out, m_rows, n, k, accumulate != 0, vec != 0,
                              vec_out != 0, blockIdx, threadIdx);
}

// Segmented decode GEMV (the torch binding launches it).
template <typename T, int MT>
__global__ void __launch_bounds__(lass::kSegGemvWarps * 32)
    lass_seg_gemv(const T* x, const T* w, const int32_t* bank, const int64_t* offs,
                  const int64_t* ids, int segs, int pairs, const T* bias, T* y, int t_rows,
                  int64_t n, int64_t k, int chunks, int vec) {
  int64_t row_block;
  int chunk;
  lass::seg_gemv_block(blockIdx.x, chunks, &row_block, &chunk);
  const int lane = threadIdx.x % 32;
  const int64_t row = row_block * lass::kSegGemvWarps + threadIdx.x / 32;
  if (row >= n) return;  // a whole warp: the shuffles below see all 32 lanes
  const int t0 = chunk * lass::kGemvMaxM;
  int pr[MT];
  lass::seg_rows_pairs<MT>(offs, ids, segs, pairs, t_rows, t0, pr);
  float acc[MT];
  lass::seg_gemv_lane<T, MT>(x, w, bank, pr, t_rows, t0, n, k, vec != 0, row, lane, acc);
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], off);
  if (lane == 0) lass::seg_gemv_store<T, MT>(acc, bias, y, t_rows, t0, n, row);
}
