// CPU emulator of the small-M backward kernels (csrc/cuda/lass_kernels.cuh small_dx_* /
// small_dw_*), built by tests/ops/test_cuda_emulated.py with nvcc into a shared library: the
// launchers' own plans (grid, vector accesses, dx splits) from lass_kernels.cu, then the kernels'
// bodies at every grid position in turn. Their bodies use no shared memory and no warp
// shuffles, so running the positions one after another computes what the launch computes.
#include "cuda/lass_kernels.cu"

#include <vector>

namespace {

template <typename F>
void each_position(dim3 grid, dim3 block, F&& body) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx)
      for (unsigned ty = 0; ty < block.y; ++ty)
        for (unsigned tx = 0; tx < block.x; ++tx) body(make_uint3(bx, by, 0), make_uint3(tx, ty, 0));
}

}  // namespace

// As lass_launch_small_dx with ws allocated here; splits <= 0: lass_small_dx_splits(sm_count).
// Returns the splits used (>= 1), or -1 where the launcher refuses the call.
extern "C" int emu_small_dx(int dtype, const void* dy, const void* w, const int32_t* bits,
                            void* dx, int m_rows, int64_t n, int64_t k, int splits,
                            int sm_count) {
  if (m_rows > lass::kSmallBwdMaxM) return -1;
  if (splits <= 0) splits = lass_small_dx_splits(m_rows, n, k, dtype, sm_count);
  if (m_rows <= 0 || n <= 0 || k <= 0) return splits;  // the launcher launches nothing
  std::vector<float> ws(splits > 1 ? (size_t)splits * m_rows * k : 0);
  float* wsp = splits > 1 ? ws.data() : nullptr;
  const cudaError_t rc = with_type_and_mt(dtype, m_rows, [&](auto tag, auto mt) {
    using T = typename decltype(tag)::type;
    constexpr int MT = decltype(mt)::value;
    const SmallDxPlan<T, MT> plan(w, dx, wsp, m_rows, k, splits);
    each_position(plan.grid, dim3(lass::kSmallDxThreads), [&](uint3 b, uint3 t) {
      lass::small_dx_at<T, MT>((const T*)dy, (const T*)w, bits, (T*)dx, wsp, m_rows, n, k,
                               splits, plan.chunks, plan.vec, b, t);
    });
    if (splits > 1) {
      const int64_t total = (int64_t)m_rows * k;
      for (int64_t i = 0; i < total; ++i) lass::small_dx_sum<T>(wsp, (T*)dx, splits, total, i);
    }
    return cudaSuccess;
  });
  return rc == cudaSuccess ? splits : -1;
}

// As lass_launch_small_dw. Returns 0, or -1 where the launcher refuses the call.
extern "C" int emu_small_dw(int dtype, int out_dtype, const void* dy, const void* x,
                            const int32_t* bits, void* out, int m_rows, int64_t n, int64_t k,
                            int accumulate) {
  if (m_rows > lass::kSmallBwdMaxM || (out_dtype != dtype && !(accumulate && out_dtype == lass::kFloat32)))
    return -1;
  if (m_rows <= 0 || n <= 0 || k <= 0) return 0;
  const dim3 block(lass::kSmallDwCols, lass::kSmallDwGroups);
  const cudaError_t rc = with_type_and_mt(dtype, m_rows, [&](auto tag, auto mt) {
    using T = typename decltype(tag)::type;
    constexpr int MT = decltype(mt)::value;
    auto run = [&](auto* o) {
      using O = std::remove_pointer_t<decltype(o)>;
      const SmallDwPlan<T, O, MT> plan(x, out, n, k);
      each_position(plan.grid, block, [&](uint3 b, uint3 t) {
        lass::small_dw_at<T, O, MT>((const T*)dy, (const T*)x, bits, o, m_rows, n, k,
                                    accumulate != 0, plan.vec, plan.vec_out, b, t);
      });
    };
    if (out_dtype == dtype) run((T*)out);
    else run((float*)out);
    return cudaSuccess;
  });
  return rc == cudaSuccess ? 0 : -1;
}

// The vector-access decisions of the plans (tests check both paths are exercised).
extern "C" int emu_small_dx_vec(int dtype, const void* w, const void* dx, int m_rows,
                                int64_t k) {
  int v = -1;
  with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return with_mt(m_rows, [&](auto mt) {
      v = SmallDxPlan<T, decltype(mt)::value>(w, dx, nullptr, m_rows, k, 1).vec ? 1 : 0;
      return cudaSuccess;
    });
  });
  return v;
}

// As lass_launch_seg_gemv: every warp's 32 lanes, their partial sums reduced by the kernel's
// butterfly (lane l adds lane l ^ off's value for off = 16, 8, 4, 2, 1), lane 0's store.
// Returns 0, or -1 where the launcher refuses the call.
extern "C" int emu_seg_gemv(int dtype, const void* x, const void* w, const int32_t* bank,
                            const int64_t* offs, const int64_t* ids, int segs, int pairs,
                            const void* bias, void* y, int t_rows, int64_t n, int64_t k) {
  if (t_rows > lass::kSegGemvMaxT || segs < 0 || pairs < 1) return -1;
  if (t_rows <= 0 || n <= 0) return 0;
  const int first_chunk = std::min(t_rows, lass::kGemvMaxM);
  const cudaError_t rc = with_type_and_mt(dtype, first_chunk, [&](auto tag, auto mt) {
    using T = typename decltype(tag)::type;
    constexpr int MT = decltype(mt)::value;
    const SegGemvPlan plan(x, w, t_rows, n, k);
    for (unsigned b = 0; b < plan.blocks; ++b) {
      int64_t row_block;
      int chunk;
      lass::seg_gemv_block(b, plan.chunks, &row_block, &chunk);
      for (int warp = 0; warp < lass::kSegGemvWarps; ++warp) {
        const int64_t row = row_block * lass::kSegGemvWarps + warp;
        if (row >= n) continue;
        const int t0 = chunk * lass::kGemvMaxM;
        float acc[32][MT];
        for (int lane = 0; lane < 32; ++lane) {
          int pr[MT];
          lass::seg_rows_pairs<MT>(offs, ids, segs, pairs, t_rows, t0, pr);
          lass::seg_gemv_lane<T, MT>((const T*)x, (const T*)w, bank, pr, t_rows, t0, n, k,
                                     plan.vec, row, lane, acc[lane]);
        }
        for (int t = 0; t < MT; ++t)
          for (int off = 16; off > 0; off >>= 1) {
            float next[32];
            for (int l = 0; l < 32; ++l) next[l] = acc[l][t] + acc[l ^ off][t];
            for (int l = 0; l < 32; ++l) acc[l][t] = next[l];
          }
        lass::seg_gemv_store<T, MT>(acc[0], (const T*)bias, (T*)y, t_rows, t0, n, row);
      }
    }
    return cudaSuccess;
  });
  return rc == cudaSuccess ? 0 : -1;
}

// As lass_launch_decode_gemv_v2 (same plan): per block, for each x chunk the staging phase by
// all 256 threads, then every lane's chunk phase (the barriers between them); then per warp
// the butterfly and lane 0's store. Returns 0, or -1 where the launcher refuses the call.
extern "C" int emu_gemv2(int dtype, const void* x, const void* w, const int32_t* bits,
                         const void* bias, void* y, int m_rows, int64_t n, int64_t k) {
  if (m_rows > lass::kGemvMaxM || !gemv2_applies(x, w, k)) return -1;
  if (n <= 0 || m_rows <= 0) return 0;
  const cudaError_t rc = with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Gemv2Plan<T> plan(m_rows, n, k);
    auto run = [&](auto mt_tag, auto r_tag) {
      constexpr int MT = decltype(mt_tag)::value, R = decltype(r_tag)::value;
      constexpr int warps = lass::kGemv2Threads / 32;
      std::vector<uint4> smem((plan.smem + 15) / 16 + 1);
      T* xs = reinterpret_cast<T*>(smem.data());
      const int64_t nw = (k + 31) / 32;
      std::vector<float> accs((size_t)warps * 32 * R * MT);
      for (unsigned b = 0; b < plan.blocks; ++b) {
        std::fill(accs.begin(), accs.end(), 0.f);
        auto acc = [&](int warp, int lane) {
          return reinterpret_cast<float(*)[MT]>(&accs[((size_t)warp * 32 + lane) * R * MT]);
        };
        for (int64_t c0 = 0; c0 < k; c0 += plan.kc) {
          const int len = (int)std::min<int64_t>(plan.kc, k - c0);
          for (int tid = 0; tid < lass::kGemv2Threads; ++tid)
            lass::gemv2_stage<T>((const T*)x, xs, m_rows, k, c0, len, plan.kc, tid,
                                 lass::kGemv2Threads);
          for (int warp = 0; warp < warps; ++warp)
            for (int lane = 0; lane < 32; ++lane)
              lass::gemv2_chunk<T, MT, R>(xs, (const T*)w, bits, m_rows, n, k, nw, plan.kc, c0,
                                          len, ((int64_t)b * warps + warp) * R, lane,
                                          acc(warp, lane));
        }
        for (int warp = 0; warp < warps; ++warp) {
          for (int r = 0; r < R; ++r)
            for (int m = 0; m < MT; ++m)
              for (int off = 16; off > 0; off >>= 1) {
                float next[32];
                for (int l = 0; l < 32; ++l) next[l] = acc(warp, l)[r][m] + acc(warp, l ^ off)[r][m];
                for (int l = 0; l < 32; ++l) acc(warp, l)[r][m] = next[l];
              }
          lass::gemv2_store<T, MT, R>(acc(warp, 0), (const T*)bias, (T*)y, m_rows, n,
                                      ((int64_t)b * warps + warp) * R);
        }
      }
    };
    return with_mt(m_rows, [&](auto mt) {
      if (plan.rows == 4) run(mt, Int<4>{});
      else run(mt, Int<2>{});
      return cudaSuccess;
    });
  });
  return rc == cudaSuccess ? 0 : -1;
}

// The one-thread-per-item kernels, every thread of the launchers' grids (256 per block):
// apply_mask (with the launcher's `vec` decision), pack, magnitude.
extern "C" int emu_apply_mask(int dtype, const void* src, const int32_t* bits, void* out,
                              int64_t rows, int64_t k, int accumulate) {
  const int64_t nw = (k + 31) / 32, total = rows * ((k + 7) / 8);
  const int vec = apply_mask_vec(src, out, k);
  const int64_t threads = (total + 255) / 256 * 256;
  const cudaError_t rc = with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t i = 0; i < threads; ++i)
      lass::apply_mask_octet<T>((const T*)src, bits, (T*)out, rows, k, nw, accumulate, vec, i);
    return cudaSuccess;
  });
  return rc == cudaSuccess ? vec : -1;
}

// masked_cast: the cross-dtype kernels (fp32 <-> bf16 / fp16) with the launcher's `vec`.
extern "C" int emu_mask_cast(int in_dtype, int out_dtype, const void* src, const int32_t* bits,
                             void* out, int64_t rows, int64_t k) {
  if (in_dtype == out_dtype || (in_dtype != lass::kFloat32 && out_dtype != lass::kFloat32))
    return -1;  // the launcher: one dtype is apply_mask's; 16-bit <-> 16-bit is refused
  const int64_t nw = (k + 31) / 32, total = rows * ((k + 7) / 8);
  const int vec = apply_mask_vec(src, out, k);
  const int64_t threads = (total + 255) / 256 * 256;
  const int half = in_dtype == lass::kFloat32 ? out_dtype : in_dtype;
  const cudaError_t rc = with_dtype(half, [&](auto tag) {
    using H = typename decltype(tag)::type;
    for (int64_t i = 0; i < threads; ++i) {
      if (in_dtype == lass::kFloat32)
        lass::apply_mask_octet<float, H>((const float*)src, bits, (H*)out, rows, k, nw, 0, vec,
                                         i);
      else
        lass::apply_mask_octet<H, float>((const H*)src, bits, (float*)out, rows, k, nw, 0, vec,
                                         i);
    }
    return cudaSuccess;
  });
  return rc == cudaSuccess ? vec : -1;
}

extern "C" void emu_pack(const bool* mask, int32_t* bits, int64_t rows, int64_t k) {
  const int64_t nw = (k + 31) / 32, threads = (rows * nw + 255) / 256 * 256;
  for (int64_t i = 0; i < threads; ++i) lass::pack_word(mask, bits, rows, k, nw, i);
}

extern "C" int emu_magnitude(int dtype, const void* w, float thr, int32_t* bits, int64_t rows,
                             int64_t k) {
  const int64_t nw = (k + 31) / 32, threads = (rows * nw + 255) / 256 * 256;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t i = 0; i < threads; ++i)
      lass::magnitude_word<T>((const T*)w, thr, bits, rows, k, nw, i);
    return cudaSuccess;
  }) == cudaSuccess ? 0 : -1;
}
