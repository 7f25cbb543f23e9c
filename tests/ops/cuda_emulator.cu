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
  const cudaError_t rc = with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return with_mt(m_rows, [&](auto mt) {
      constexpr int MT = decltype(mt)::value;
      const SmallDxPlan<T, MT> plan(w, dx, wsp, k, splits);
      each_position(plan.grid, dim3(lass::kSmallDxThreads), [&](uint3 b, uint3 t) {
        lass::small_dx_at<T, MT>((const T*)dy, (const T*)w, bits, (T*)dx, wsp, m_rows, n, k,
                                 splits, plan.vec, b, t);
      });
      if (splits > 1) {
        const int64_t total = (int64_t)m_rows * k;
        for (int64_t i = 0; i < total; ++i) lass::small_dx_sum<T>(wsp, (T*)dx, splits, total, i);
      }
      return cudaSuccess;
    });
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
  const cudaError_t rc = with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return with_mt(m_rows, [&](auto mt) {
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
      v = SmallDxPlan<T, decltype(mt)::value>(w, dx, nullptr, k, 1).vec ? 1 : 0;
      return cudaSuccess;
    });
  });
  return v;
}
