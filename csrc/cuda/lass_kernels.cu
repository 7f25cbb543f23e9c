// Compilation unit for the torch-free kernels (nvcc -c checks it; the torch binding in
// binding.cpp launches them; cupy compiles lass_kernels.cuh itself with NVRTC).
#include "lass_kernels.cuh"

#include <algorithm>
#include <type_traits>

#include <cstdlib>
#include <cstring>

namespace {

// 16-byte rows of x and w: K % 8 == 0 and both 16-byte aligned (v2 needs it; v3 and the
// segmented GEMV then load 8 elements a step as vectors).
bool gemv2_applies(const void* x, const void* w, int64_t k) {
  return k % 8 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0;
}

// $LASS_SPARSE_CUDA_GEMV is `name` (read per call, so one process can time every variant; the
// default, unset or "v1", is v1). v2: the v2 decode kernel; v3: the segmented GEMV's kernel with
// one pair (no table), which also takes up to kSegGemvMaxT rows.
bool gemv_variant(const char* name) {
  const char* v = std::getenv("LASS_SPARSE_CUDA_GEMV");
  return v != nullptr && std::strcmp(v, name) == 0;
}

// How v2 launches for m rows of [n, k] (the tests' emulator runs the same plan): MT, R rows per
// warp, the x chunk (kc elements per row, a multiple of the warp step, m rows in
// kGemv2SmemBytes), the shared memory and the grid.
template <typename T> struct Gemv2Plan {
  int mt, rows, kc;
  size_t smem;
  unsigned blocks;
  Gemv2Plan(int m_rows, int64_t n, int64_t k) {
    mt = lass::small_mt(m_rows);  // the rows bound: 1, 2, 4, 8 or 16
    rows = n >= lass::kGemv2Rows4MinN ? 4 : 2;
    const int64_t step = lass::kGemv2Step;
    int64_t c = (lass::kGemv2SmemBytes / ((int64_t)mt * (int64_t)sizeof(T))) / step * step;
    const int64_t k_up = (k + step - 1) / step * step;
    kc = (int)(c > k_up ? k_up : c);
    smem = (size_t)m_rows * (size_t)kc * sizeof(T);
    const int64_t per_block = (int64_t)(lass::kGemv2Threads / 32) * rows;
    blocks = (unsigned)((n + per_block - 1) / per_block);
  }
};

template <typename T>
cudaError_t launch_gemv2(const T* x, const T* w, const int32_t* bits, const T* bias, T* y,
                         int m_rows, int64_t n, int64_t k, cudaStream_t stream) {
  const int64_t nw = (k + 31) / 32;
  const Gemv2Plan<T> plan(m_rows, n, k);
  const int mt = plan.mt, rows = plan.rows, kci = plan.kc;
  const size_t smem = plan.smem;
  const dim3 grid(plan.blocks), block(lass::kGemv2Threads);
#define LASS_GEMV2_CASE(SUFFIX, MT, R)                                                          \
  if (mt == MT && rows == R) {                                                                  \
    lass_decode_gemv2_##SUFFIX##_m##MT##_r##R<<<grid, block, smem, stream>>>(                   \
        x, w, bits, bias, y, m_rows, n, k, nw, kci);                                            \
    return cudaGetLastError();                                                                  \
  }
#define LASS_GEMV2_CASES(SUFFIX)                                                                \
  LASS_GEMV2_CASE(SUFFIX, 1, 2) LASS_GEMV2_CASE(SUFFIX, 1, 4) LASS_GEMV2_CASE(SUFFIX, 2, 2)     \
  LASS_GEMV2_CASE(SUFFIX, 2, 4) LASS_GEMV2_CASE(SUFFIX, 4, 2) LASS_GEMV2_CASE(SUFFIX, 4, 4)     \
  LASS_GEMV2_CASE(SUFFIX, 8, 2) LASS_GEMV2_CASE(SUFFIX, 8, 4) LASS_GEMV2_CASE(SUFFIX, 16, 2)    \
  LASS_GEMV2_CASE(SUFFIX, 16, 4)
  if constexpr (sizeof(T) == 4) {
    LASS_GEMV2_CASES(f32)
  } else if constexpr (std::is_same<T, __half>::value) {
    LASS_GEMV2_CASES(f16)
  } else {
    LASS_GEMV2_CASES(bf16)
  }
#undef LASS_GEMV2_CASES
#undef LASS_GEMV2_CASE
  return cudaErrorInvalidValue;
}

// ---- small-M backward: how the kernels launch (the tests' CPU emulator runs the same plans)

template <typename T> struct Tag { using type = T; };
template <int V> using Int = std::integral_constant<int, V>;

// f(Tag<T>{}) for the dtype code (cudaErrorInvalidValue for an unknown one).
template <typename F> cudaError_t with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case lass::kFloat32: return f(Tag<float>{});
    case lass::kFloat16: return f(Tag<__half>{});
    case lass::kBFloat16: return f(Tag<__nv_bfloat16>{});
    default: return cudaErrorInvalidValue;
  }
}

// f(Int<MT>{}) for the rows bound of m rows (1 <= m <= kSmallBwdMaxM).
template <typename F> cudaError_t with_mt(int m, F&& f) {
  switch (lass::small_mt(m)) {
    case 1: return f(Int<1>{});
    case 2: return f(Int<2>{});
    case 4: return f(Int<4>{});
    case 8: return f(Int<8>{});
    default: return f(Int<16>{});
  }
}

// f(Tag<T>{}, Int<MT>{}): both of the above (the small-M and segmented kernels' launchers).
template <typename F> cudaError_t with_type_and_mt(int dtype, int m, F&& f) {
  return with_dtype(dtype,
                    [&](auto tag) { return with_mt(m, [&](auto mt) { return f(tag, mt); }); });
}

bool aligned(const void* p, int bytes) { return (uintptr_t)p % (uintptr_t)bytes == 0; }
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The row chunks of m rows of dy / dx (kSmallBwdChunk each).
int small_chunks(int m_rows) { return (int)cdiv(m_rows, lass::kSmallBwdChunk); }

// dx: grid (column blocks x row chunks, splits) of kSmallDxThreads; `vec` when every run of V
// columns is in range and W, dx and the partials are aligned to their V-element accesses.
template <typename T, int MT> struct SmallDxPlan {
  static constexpr int V = lass::small_vec<T, MT>();
  int chunks;
  dim3 grid;
  bool vec;
  SmallDxPlan(const void* w, const void* dx, const float* ws, int m_rows, int64_t k, int splits)
      : chunks(small_chunks(m_rows)),
        grid((unsigned)(cdiv(k, (int64_t)lass::kSmallDxThreads * V) * chunks), (unsigned)splits),
        vec(k % V == 0 && aligned(w, std::min(16, V * (int)sizeof(T))) &&
            aligned(dx, std::min(16, V * (int)sizeof(T))) &&
            (ws == nullptr || aligned(ws, std::min(16, V * 4)))) {}
};

// dW: grid (row blocks, column blocks) of (kSmallDwCols, kSmallDwGroups) threads.
template <typename T, typename O, int MT> struct SmallDwPlan {
  static constexpr int V = lass::small_vec<T, MT>();
  dim3 grid;
  bool vec, vec_out;
  SmallDwPlan(const void* x, const void* out, int64_t n, int64_t k)
      : grid((unsigned)cdiv(n, (int64_t)lass::kSmallDwGroups * lass::small_dw_rows<MT>()),
             (unsigned)cdiv(k, (int64_t)lass::kSmallDwCols * V)),
        vec(k % V == 0 && aligned(x, std::min(16, V * (int)sizeof(T)))),
        vec_out(k % V == 0 && aligned(out, std::min(16, V * (int)sizeof(O)))) {}
};

constexpr int kSumThreads = 256;

// apply_mask: 128-bit accesses when every octet is whole and src and out are 16-byte aligned.
int apply_mask_vec(const void* src, const void* out, int64_t k) {
  return k % 8 == 0 && aligned(src, 16) && aligned(out, 16);
}

// Segmented GEMV: blocks of kSegGemvWarps output rows x chunks of kGemvMaxM x rows (MT from
// the rows of the first, largest chunk); `vec` for 16-byte W and x rows.
struct SegGemvPlan {
  int chunks;
  unsigned blocks;
  bool vec;
  SegGemvPlan(const void* x, const void* w, int t_rows, int64_t n, int64_t k)
      : chunks((int)cdiv(t_rows, lass::kGemvMaxM)),
        blocks((unsigned)(cdiv(n, lass::kSegGemvWarps) * chunks)),
        vec(gemv2_applies(x, w, k)) {}
};

}  // namespace

extern "C" cudaError_t lass_launch_seg_gemv(int dtype, const void* x, const void* w,
                                            const int32_t* bits_bank, const int64_t* seg_offsets,
                                            const int64_t* seg_pair, int segs, int pairs,
                                            const void* bias, void* y, int t_rows, int64_t n,
                                            int64_t k, cudaStream_t stream) {
  if (t_rows > lass::kSegGemvMaxT || segs < 0 || pairs < 1) return cudaErrorInvalidValue;
  if (t_rows <= 0 || n <= 0) return cudaSuccess;  // nothing to write
  return with_type_and_mt(dtype, std::min(t_rows, lass::kGemvMaxM), [&](auto tag, auto mt) {
    using T = typename decltype(tag)::type;
    constexpr int MT = decltype(mt)::value;
    const SegGemvPlan plan(x, w, t_rows, n, k);
    lass_seg_gemv<T, MT><<<plan.blocks, lass::kSegGemvWarps * 32, 0, stream>>>(
        (const T*)x, (const T*)w, bits_bank, seg_offsets, seg_pair, segs, pairs,
        (const T*)bias, (T*)y, t_rows, n, k, plan.chunks, plan.vec ? 1 : 0);
    return cudaGetLastError();
  });
}

extern "C" int lass_small_dx_splits(int m_rows, int64_t n, int64_t k, int dtype,
                                    int sm_count) {
  // about 4 blocks per SM, each split reducing at least kSmallDxMinSplitRows weight rows (the
  // partials, splits * m * k floats, stay well below W's bytes)
  const int v = lass::small_vec_elems(lass::small_mt(m_rows), dtype == lass::kFloat32 ? 4 : 2);
  const int64_t blocks = std::max<int64_t>(
      1, cdiv(k, (int64_t)lass::kSmallDxThreads * v) * small_chunks(std::max(m_rows, 1)));
  const int64_t want = cdiv(4 * (int64_t)std::max(sm_count, 1), blocks);
  const int64_t most = std::max<int64_t>(1, n / lass::kSmallDxMinSplitRows);
  return (int)std::min<int64_t>({std::max<int64_t>(want, 1), most, 65535});
}

extern "C" cudaError_t lass_launch_small_dx(int dtype, const void* dy, const void* w,
                                            const int32_t* bits, void* dx, float* ws, int m_rows,
                                            int64_t n, int64_t k, int splits,
                                            cudaStream_t stream) {
  if (m_rows > lass::kSmallBwdMaxM || splits < 1 || splits > 65535 || (splits > 1 && !ws))
    return cudaErrorInvalidValue;
  if (m_rows <= 0 || n <= 0 || k <= 0) return cudaSuccess;  // the caller zero-fills
  return with_type_and_mt(dtype, m_rows, [&](auto tag, auto mt) {
    using T = typename decltype(tag)::type;
    constexpr int MT = decltype(mt)::value;
    const SmallDxPlan<T, MT> plan(w, dx, splits > 1 ? ws : nullptr, m_rows, k, splits);
    lass_small_dx<T, MT><<<plan.grid, lass::kSmallDxThreads, 0, stream>>>(
        (const T*)dy, (const T*)w, bits, (T*)dx, ws, m_rows, n, k, splits, plan.chunks,
        plan.vec ? 1 : 0);
    if (splits > 1) {
      const int64_t total = (int64_t)m_rows * k;
      lass_small_dx_sum<T><<<(unsigned)cdiv(total, kSumThreads), kSumThreads, 0, stream>>>(
          ws, (T*)dx, splits, total);
    }
    return cudaGetLastError();
  });
}

extern "C" cudaError_t lass_launch_small_dw(int dtype, int out_dtype, const void* dy,
                                            const void* x, const int32_t* bits, void* out,
                                            int m_rows, int64_t n, int64_t k, int accumulate,
                                            cudaStream_t stream) {
  if (m_rows > lass::kSmallBwdMaxM) return cudaErrorInvalidValue;
  if (out_dtype != dtype && !(accumulate && out_dtype == lass::kFloat32))
    return cudaErrorInvalidValue;
  if (m_rows <= 0 || n <= 0 || k <= 0) return cudaSuccess;  // the caller zero-fills
  return with_type_and_mt(dtype, m_rows, [&](auto tag, auto mt) {
    using T = typename decltype(tag)::type;
    constexpr int MT = decltype(mt)::value;
    const dim3 block(lass::kSmallDwCols, lass::kSmallDwGroups);
    auto launch = [&](auto* o) {  // O: T, or float accumulating
      using O = std::remove_pointer_t<decltype(o)>;
      const SmallDwPlan<T, O, MT> plan(x, out, n, k);
      lass_small_dw<T, O, MT><<<plan.grid, block, 0, stream>>>(
          (const T*)dy, (const T*)x, bits, o, m_rows, n, k, accumulate, plan.vec ? 1 : 0,
          plan.vec_out ? 1 : 0);
    };
    if (out_dtype == dtype)
      launch((T*)out);
    else
      launch((float*)out);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t lass_launch_decode_gemv_v2(int dtype, const void* x, const void* w,
                                                  const int32_t* bits, const void* bias, void* y,
                                                  int m_rows, int64_t n, int64_t k,
                                                  cudaStream_t stream) {
  if (n <= 0 || m_rows <= 0) return cudaSuccess;  // a zero-size grid is a launch error
  if (m_rows > lass::kGemvMaxM || !gemv2_applies(x, w, k)) return cudaErrorInvalidValue;
  switch (dtype) {
    case lass::kFloat32:
      return launch_gemv2((const float*)x, (const float*)w, bits, (const float*)bias, (float*)y,
                          m_rows, n, k, stream);
    case lass::kFloat16:
      return launch_gemv2((const __half*)x, (const __half*)w, bits, (const __half*)bias,
                          (__half*)y, m_rows, n, k, stream);
    case lass::kBFloat16:
      return launch_gemv2((const __nv_bfloat16*)x, (const __nv_bfloat16*)w, bits,
                          (const __nv_bfloat16*)bias, (__nv_bfloat16*)y, m_rows, n, k, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// Host launchers with C linkage for the torch binding (no torch headers here); declared in
// lass_abi.h.
extern "C" int lass_decode_gemv_max_rows() {
  return gemv_variant("v3") ? lass::kSegGemvMaxT : lass::kGemvMaxM;
}

extern "C" cudaError_t lass_launch_decode_gemv(int dtype, const void* x, const void* w,
                                               const int32_t* bits, const void* bias, void* y,
                                               int m_rows, int64_t n, int64_t k,
                                               cudaStream_t stream) {
  if (n <= 0 || m_rows <= 0) return cudaSuccess;  // a zero-size grid is a launch error
  if (gemv_variant("v3"))  // bits as a bank of one pair, no table: pair 0 for every row
    return lass_launch_seg_gemv(dtype, x, w, bits, nullptr, nullptr, 0, 1, bias, y, m_rows, n,
                                k, stream);
  if (gemv_variant("v2") && k > 0 && gemv2_applies(x, w, k))
    return lass_launch_decode_gemv_v2(dtype, x, w, bits, bias, y, m_rows, n, k, stream);
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

extern "C" cudaError_t lass_launch_apply_mask(int dtype, const void* src, const int32_t* bits,
                                              void* out, int64_t rows, int64_t k, int accumulate,
                                              cudaStream_t stream) {
  const int64_t nw = (k + 31) / 32, total = rows * ((k + 7) / 8);
  if (total == 0) return cudaSuccess;
  const int vec = apply_mask_vec(src, out, k);
  const unsigned blocks = (unsigned)((total + 255) / 256);
  switch (dtype) {
    case lass::kFloat32: lass_apply_mask_f32<<<blocks, 256, 0, stream>>>((const float*)src, bits, (float*)out, rows, k, nw, accumulate, vec); break;
    case lass::kFloat16: lass_apply_mask_f16<<<blocks, 256, 0, stream>>>((const __half*)src, bits, (__half*)out, rows, k, nw, accumulate, vec); break;
    case lass::kBFloat16: lass_apply_mask_bf16<<<blocks, 256, 0, stream>>>((const __nv_bfloat16*)src, bits, (__nv_bfloat16*)out, rows, k, nw, accumulate, vec); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t lass_launch_mask_cast(int in_dtype, int out_dtype, const void* src,
                                              const int32_t* bits, void* out, int64_t rows,
                                              int64_t k, cudaStream_t stream) {
  if (in_dtype == out_dtype) return lass_launch_apply_mask(in_dtype, src, bits, out, rows, k, 0,
                                                           stream);
  const int64_t nw = (k + 31) / 32, total = rows * ((k + 7) / 8);
  if (total == 0) return cudaSuccess;
  const int vec = apply_mask_vec(src, out, k);
  const unsigned blocks = (unsigned)((total + 255) / 256);
  const float* f32 = (const float*)src;
  if (in_dtype == lass::kFloat32 && out_dtype == lass::kBFloat16)
    lass_mask_cast_f32_bf16<<<blocks, 256, 0, stream>>>(f32, bits, (__nv_bfloat16*)out, rows, k, nw, vec);
  else if (in_dtype == lass::kFloat32 && out_dtype == lass::kFloat16)
    lass_mask_cast_f32_f16<<<blocks, 256, 0, stream>>>(f32, bits, (__half*)out, rows, k, nw, vec);
  else if (in_dtype == lass::kBFloat16 && out_dtype == lass::kFloat32)
    lass_mask_cast_bf16_f32<<<blocks, 256, 0, stream>>>((const __nv_bfloat16*)src, bits, (float*)out, rows, k, nw, vec);
  else if (in_dtype == lass::kFloat16 && out_dtype == lass::kFloat32)
    lass_mask_cast_f16_f32<<<blocks, 256, 0, stream>>>((const __half*)src, bits, (float*)out, rows, k, nw, vec);
  else
    return cudaErrorInvalidValue;
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
