// The one ABI between the torch-free CUDA kernels (lass_kernels.cuh / .cu), the torch binding
// (binding.cpp) and the cupy loader (lass_sparse/backends/_cuda_common.py reads the constants and
// the AdamWTensor field order from this file): dtype codes, limits, structs, host launchers.
// Torch-free and NVRTC-safe (cupy compiles it, inlined into lass_kernels.cuh, at run time).
#pragma once

#ifdef __CUDACC_RTC__  // NVRTC (cupy): no libc headers
typedef signed char int8_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uintptr_t;
#else
#include <cstdint>
#endif

namespace lass {

// The launchers' `dtype` argument; kernels are named <name>_f32 / _f16 / _bf16.
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Decode GEMV: the most rows of x one launch serves (fp32 accumulators per row in registers).
constexpr int kGemvMaxM = 16;
// Decode GEMV v2 (LASS_SPARSE_CUDA_GEMV=v2): threads per block, bytes of shared memory for the
// staged x chunk (rows x kc elements; kc a multiple of kGemv2Step), weights per warp step, and
// the N from which a warp computes 4 rows instead of 2.
constexpr int kGemv2Threads = 256;
constexpr int kGemv2SmemBytes = 32768;
constexpr int kGemv2Step = 256;
constexpr int kGemv2Rows4MinN = 16384;
// Small-M backward (dx and dW of at most kSmallBwdMaxM rows, taken kSmallBwdChunk at a time;
// lass_kernels.cuh small_dx_* / small_dw_*): threads per dx block (each owns a run of columns),
// dW block shape (columns x row groups) and weight rows per dW thread, and the fewest weight
// rows a dx split of N reduces.
constexpr int kSmallBwdMaxM = 64;
constexpr int kSmallBwdChunk = 16;
constexpr int kSmallDxThreads = 128;
constexpr int kSmallDwCols = 32;
constexpr int kSmallDwGroups = 4;
constexpr int kSmallDwRows = 16;
constexpr int kSmallDxMinSplitRows = 64;
// Segmented decode GEMV (mixed-pair rows, lass_kernels.cuh seg_gemv_*): the most rows of x one
// call serves (blocks take them kGemvMaxM at a time) and warps per block (one output row each).
constexpr int kSegGemvMaxT = 64;
constexpr int kSegGemvWarps = 8;
// Masked AdamW: elements per block (the chunk table's granularity) and threads per block.
constexpr int64_t kAdamWChunk = 65536;
constexpr int kAdamWBlock = 512;

// One tensor of a multi-tensor AdamW launch. Hosts build a table of these as int64[T, 8] rows in
// this field order (pointers are 64-bit), so the layout is fixed here.
struct AdamWTensor {
  void* p;
  const void* g;
  float* m;
  float* v;
  const int32_t* bits;  // nullptr: unmasked (plain AdamW)
  int64_t numel;
  int64_t k;   // last dim (row length) for the mask
  int64_t nw;  // words per row
};
static_assert(sizeof(AdamWTensor) == 8 * sizeof(int64_t), "AdamWTensor is one int64[8] row");

struct AdamWArgs {
  float lr, beta1, beta2, eps, weight_decay, bc1, bc2;  // bc*: bias corrections 1 - beta^step
  int maximize;
};

}  // namespace lass

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime_api.h>
// Host launchers (lass_kernels.cu), called by the torch binding. Each returns cudaSuccess without
// launching when there is nothing to do (a zero-size grid is a launch error).
extern "C" {
cudaError_t lass_launch_decode_gemv(int dtype, const void* x, const void* w, const int32_t* bits,
                                    const void* bias, void* y, int m_rows, int64_t n, int64_t k,
                                    cudaStream_t stream);
// The most rows lass_launch_decode_gemv takes: kGemvMaxM, or kSegGemvMaxT under
// LASS_SPARSE_CUDA_GEMV=v3 (the segmented GEMV's kernel with one pair; read per call).
int lass_decode_gemv_max_rows(void);
// v2 (issue 29): needs k % 8 == 0 and 16-byte aligned x and w; cudaErrorInvalidValue otherwise.
// lass_launch_decode_gemv runs it instead of v1 when LASS_SPARSE_CUDA_GEMV=v2 and it applies.
cudaError_t lass_launch_decode_gemv_v2(int dtype, const void* x, const void* w,
                                       const int32_t* bits, const void* bias, void* y,
                                       int m_rows, int64_t n, int64_t k, cudaStream_t stream);
// out[rows, k] = src ⊙ M, or (accumulate) out += src ⊙ M leaving off-mask entries as they are;
// out may be src. Contiguous rows; bits int32[rows, ceil(k/32)].
cudaError_t lass_launch_apply_mask(int dtype, const void* src, const int32_t* bits, void* out,
                                   int64_t rows, int64_t k, int accumulate, cudaStream_t stream);
// out[rows, k] = (src ⊙ M) as out_dtype (masked_cast): one dtype (apply_mask), fp32 -> bf16 /
// fp16 or bf16 / fp16 -> fp32; other pairs cudaErrorInvalidValue.
cudaError_t lass_launch_mask_cast(int in_dtype, int out_dtype, const void* src,
                                  const int32_t* bits, void* out, int64_t rows, int64_t k,
                                  cudaStream_t stream);
// Small-M backward (m_rows <= kSmallBwdMaxM; dy [m, n], w / bits / dW [n, k], x / dx [m, k],
// contiguous). dx: `splits` (lass_small_dx_splits) blocks share N; with splits > 1, ws holds
// float32[splits, m, k] partials, summed in split order (deterministic). dW: out = (dyᵀ x) ⊙ M,
// or with `accumulate` out += on the mask only, off-mask entries bit-for-bit kept; out_dtype is
// dtype or, accumulating, kFloat32. Nothing is launched (cudaSuccess) when m, n or k is 0: the
// caller fills dx / dW with zeros. cudaErrorInvalidValue for m_rows > kSmallBwdMaxM, an unknown
// dtype or splits < 1 (or > 1 without ws).
int lass_small_dx_splits(int m_rows, int64_t n, int64_t k, int dtype, int sm_count);
cudaError_t lass_launch_small_dx(int dtype, const void* dy, const void* w, const int32_t* bits,
                                 void* dx, float* ws, int m_rows, int64_t n, int64_t k,
                                 int splits, cudaStream_t stream);
cudaError_t lass_launch_small_dw(int dtype, int out_dtype, const void* dy, const void* x,
                                 const int32_t* bits, void* out, int m_rows, int64_t n,
                                 int64_t k, int accumulate, cudaStream_t stream);
// Segmented decode GEMV: y[t] = x[t] (W ⊙ M_{pair(t)})ᵀ (+ b) for t_rows <= kSegGemvMaxT rows;
// row t's pair is seg_pair[s] for seg_offsets[s] <= t < seg_offsets[s + 1] (int64 tables on
// the device, read by the kernel: no host read). The kernel clamps the table (offsets into
// [0, T] and non-decreasing, pair ids into [0, P)) so no value reaches outside the tensors; the
// op checks the values. Null tables: pair 0 for every row. cudaErrorInvalidValue for
// t_rows > kSegGemvMaxT or an unknown dtype.
cudaError_t lass_launch_seg_gemv(int dtype, const void* x, const void* w,
                                 const int32_t* bits_bank, const int64_t* seg_offsets,
                                 const int64_t* seg_pair, int segs, int pairs, const void* bias,
                                 void* y, int t_rows, int64_t n, int64_t k,
                                 cudaStream_t stream);
cudaError_t lass_launch_pack(const bool* mask, int32_t* bits, int64_t rows, int64_t k,
                             cudaStream_t stream);
cudaError_t lass_launch_unpack(const int32_t* bits, bool* mask, int64_t rows, int64_t k,
                               cudaStream_t stream);
cudaError_t lass_launch_magnitude_pack(int dtype, const void* w, float thr, int32_t* bits,
                                       int64_t rows, int64_t k, cudaStream_t stream);
// tensors / chunk tables live in device memory (filled by the caller); one launch for the list.
cudaError_t lass_launch_masked_adamw(int dtype, const lass::AdamWTensor* tensors,
                                     const int32_t* chunk_tensor, const int64_t* chunk_start,
                                     int64_t chunks, int64_t chunk_size, lass::AdamWArgs args,
                                     cudaStream_t stream);
}
#endif
