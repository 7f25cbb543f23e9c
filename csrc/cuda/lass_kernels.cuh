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

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ------------------------------------------------------------------------------ pack / unpack

// One thread per output word: 32 mask bytes -> one int32.
__device__ __forceinline__ void pack_word(const bool* mask, int32_t* bits, int64_t rows,
                                          int64_t k, int64_t nw, int64_t idx) {
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
__device__ __forceinline__ void magnitude_word(const T* w, float thr, int32_t* bits,
                                               int64_t rows, int64_t k, int64_t nw,
                                               int64_t idx) {
  if (idx >= rows * nw) return;
  const int64_t r = idx / nw, wi = idx % nw;
  const T* src = w + r * k + wi * 32;
  const int n = (int)min((int64_t)32, k - wi * 32);
  uint32_t word = 0;
  for (int j = 0; j < n; ++j) word |= (uint32_t)(fabsf(to_float(src[j])) > thr) << j;
  bits[idx] = (int32_t)word;
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

// ------------------------------------------------------------------------------ masked AdamW
// Multi-tensor: one launch over a list of tensors described by a chunk table. Entries whose
// mask bit is 0 keep p, exp_avg and exp_avg_sq bit-for-bit (nothing is written).
// (AdamWTensor / AdamWArgs: lass_abi.h)
template <typename T>
__device__ __forceinline__ void adamw_element(const AdamWTensor& t, const AdamWArgs& a,
                                              int64_t i) {
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
