// Compilation unit for the torch-free kernels (nvcc -c checks it; the torch binding in
// binding.cpp launches them; cupy compiles lass_kernels.cuh itself with NVRTC).
#include "lass_kernels.cuh"

// Host launchers with C linkage for the torch binding (no torch headers here); declared in
// lass_abi.h.
extern "C" cudaError_t lass_launch_decode_gemv(int dtype, const void* x, const void* w,
                                               const int32_t* bits, const void* bias, void* y,
                                               int m_rows, int64_t n, int64_t k,
                                               cudaStream_t stream) {
  if (n <= 0 || m_rows <= 0) return cudaSuccess;  // a zero-size grid is a launch error
  const int64_t nw = (k + 31) / 32;
  const int warps = 8;
  if (m_rows > lass::kGemvMaxM) return cudaErrorInvalidValue;
  const dim3 grid((unsigned)((n + warps - 1) / warps)), block(32 * warps);
  switch (dtype) {
    case lass::kFloat32:
      lass_decode_gemv_f32<<<grid, block, 0, stream>>>(
          (const float*)x, (const float*)w, bits, (const float*)bias, (float*)y, m_rows, n, k, nw);
      break;
    case lass::kFloat16:
      lass_decode_gemv_f16<<<grid, block, 0, stream>>>((const __half*)x, (const __half*)w, bits,
                                                       (const __half*)bias, (__half*)y, m_rows,
                                                       n, k, nw);
      break;
    case lass::kBFloat16:
      lass_decode_gemv_bf16<<<grid, block, 0, stream>>>(
          (const __nv_bfloat16*)x, (const __nv_bfloat16*)w, bits, (const __nv_bfloat16*)bias,
          (__nv_bfloat16*)y, m_rows, n, k, nw);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t lass_launch_pack(const bool* mask, int32_t* bits, int64_t rows,
                                        int64_t k, cudaStream_t stream) {
  const int64_t nw = (k + 31) / 32, total = rows * nw;
  if (total == 0) return cudaSuccess;
  lass_pack_mask<<<(unsigned)((total + 255) / 256), 256, 0, stream>>>(mask, bits, rows, k, nw);
  return cudaGetLastError();
}

extern "C" cudaError_t lass_launch_unpack(const int32_t* bits, bool* mask, int64_t rows,
                                          int64_t k, cudaStream_t stream) {
  const int64_t nw = (k + 31) / 32, total = rows * k;
  if (total == 0) return cudaSuccess;
  lass_unpack_mask<<<(unsigned)((total + 255) / 256), 256, 0, stream>>>(bits, mask, rows, k, nw);
  return cudaGetLastError();
}

extern "C" cudaError_t lass_launch_magnitude_pack(int dtype, const void* w, float thr,
                                                  int32_t* bits, int64_t rows, int64_t k,
                                                  cudaStream_t stream) {
  const int64_t nw = (k + 31) / 32, total = rows * nw;
  if (total == 0) return cudaSuccess;
  const unsigned blocks = (unsigned)((total + 255) / 256);
  switch (dtype) {
    case lass::kFloat32: lass_magnitude_pack_f32<<<blocks, 256, 0, stream>>>((const float*)w, thr, bits, rows, k, nw); break;
    case lass::kFloat16: lass_magnitude_pack_f16<<<blocks, 256, 0, stream>>>((const __half*)w, thr, bits, rows, k, nw); break;
    case lass::kBFloat16: lass_magnitude_pack_bf16<<<blocks, 256, 0, stream>>>((const __nv_bfloat16*)w, thr, bits, rows, k, nw); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t lass_launch_masked_adamw(int dtype, const lass::AdamWTensor* tensors,
                                                const int32_t* chunk_tensor,
                                                const int64_t* chunk_start, int64_t chunks,
                                                int64_t chunk_size, lass::AdamWArgs args,
                                                cudaStream_t stream) {
  if (chunks == 0) return cudaSuccess;
  const unsigned grid = (unsigned)chunks;
  switch (dtype) {
    case lass::kFloat32: lass_masked_adamw_f32<<<grid, lass::kAdamWBlock, 0, stream>>>(
          tensors, chunk_tensor, chunk_start, chunk_size, args.lr, args.beta1, args.beta2, args.eps,
          args.weight_decay, args.bc1, args.bc2, args.maximize); break;
    case lass::kFloat16: lass_masked_adamw_f16<<<grid, lass::kAdamWBlock, 0, stream>>>(
          tensors, chunk_tensor, chunk_start, chunk_size, args.lr, args.beta1, args.beta2, args.eps,
          args.weight_decay, args.bc1, args.bc2, args.maximize); break;
    case lass::kBFloat16: lass_masked_adamw_bf16<<<grid, lass::kAdamWBlock, 0, stream>>>(
          tensors, chunk_tensor, chunk_start, chunk_size, args.lr, args.beta1, args.beta2, args.eps,
          args.weight_decay, args.bc1, args.bc2, args.maximize); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
