#pragma once
// The masked linear kernels of csrc/cpu, one file per kernel family, and what they share:
//   masked_linear.cpp  the op-level kernels (forward, dx, dW, dW accumulation): argument checks
//                      and the choice of kernel family per dtype and row count; the C++ autograd
//                      node; the entries under the public names
//   gemv.cpp           forward at few rows (M <= kGemvMaxRows): mask bits decoded in the inner
//                      loop (AVX-512 masked loads, AVX512-BF16 dot products, portable loops)
//   dx_bf16dp.cpp      dx at few rows, bf16 with AVX512-BF16, no decoded copy of W
//   panel_bf16.cpp     dx and dW, bf16 with AVX512-BF16, up to ~128 rows (register panels)
//   panel_fp32.cpp     fp32 forward and segmented forward: x packed in panels, decoded W tiles
//   small_m.cpp        fp32 dx and dW at few rows: one pass, masked loads, no W tile, no GEMM
//   tiled.cpp          decode -> BLAS: a cache-sized tile of W ⊙ M at a time into at::mm_out
//   segmented.cpp      segmented_masked_linear (mixed pairs): checks, kernel choice, its entry
//   amx_bf16.cpp       bf16 forward, dx and dW on AMX tiles (Intel AMX-BF16), W ⊙ M staged in
//                      cache-resident strips
//   simd.h             masked row primitives (masked_copy, masked_add) for all of them
// Callers check dtypes, shapes and layout (2-D, contiguous, bits int32[N, ceil(K/32)]) before
// any kernel below runs.
//
// Determinism: every kernel computes each output element in one thread with a fixed reduction
// order (work is split over output rows, columns or tiles; no atomics, no sums across threads),
// so results are bit-identical run to run at a fixed thread count. The tiled.cpp routes size
// their tiles by at::get_num_threads() and BLAS may round a tile of another shape differently:
// they may change bits with the thread count; the other families do not
// (tests/ops/test_determinism.py). The AMX kernels (amx_bf16.cpp) too: each output element is
// summed by one thread in a fixed order, whatever the strip, group or chunk sizes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common.h"
#include "simd.h"

namespace lass_sparse_cpu {

// Every loop over a register tile's rows or vectors carries `#pragma GCC unroll`: one left
// rolled makes GCC keep the tile's accumulators in a stack array, a store and a load each per
// tile (the bf16 dW tile ran at 1.3-1.5x dense dW at M = 16 that way, 0.9-1.0x unrolled).
constexpr int64_t kGemvMaxRows = 16;

// Largest M served by the decode GEMV (the rest: tiled decode -> BLAS). Env overrides per dtype:
// LASS_SPARSE_CPU_GEMV_MAX_M (fp32/fp64), LASS_SPARSE_CPU_GEMV_MAX_M_BF16.
inline int64_t gemv_max_rows(at::ScalarType t) {
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

inline int64_t tile_bytes() {
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
inline int64_t tile_extent(int64_t other, int64_t elt, int64_t total, int64_t align,
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
inline int64_t min_tile(int64_t total, int64_t align) {
  return std::min(kMinTile, tile_extent(1, 1, total, align));
}

// The CPU has AVX512-BF16 dot products (vdpbf16ps) and AVX-512 is not turned off.
inline bool has_avx512_bf16() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

// $LASS_SPARSE_CPU_PANEL_GEMM=0 turns the panel kernel off (the BLAS path: benchmarks, tests).
inline bool panel_gemm_enabled() {
  const char* v = std::getenv("LASS_SPARSE_CPU_PANEL_GEMM");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// An integer knob from the environment, or `fallback` (callers keep it in a static: read once).
inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : fallback;
}

// out[r - r0, :] = (W ⊙ M)[r, k0:k0+kc] for r in [r0, r1); k0 is a multiple of 32.
template <typename T>
inline void decode_block(const T* w, const int32_t* bits, int64_t k, int64_t r0, int64_t r1,
                         int64_t k0, int64_t kc, T* out) {
  const int64_t nw = num_words(k);
  for (int64_t r = r0; r < r1; ++r)
    masked_copy(w + r * k + k0, bits + r * nw + k0 / 32, kc, out + (r - r0) * kc);
}

// dx_bf16dp at most this many rows (dx_bf16dp.cpp; $LASS_SPARSE_CPU_DX_DP_MAX_M lowers it).
constexpr int64_t kDxDotMaxRows = 8;

// ---- gemv.cpp
// y [M, N] = x [M, K] @ (W ⊙ M)ᵀ (+ bias) for M <= kGemvMaxRows, parallel over output rows.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                const c10::optional<at::Tensor>& bias);

// ---- dx_bf16dp.cpp
// dx (bf16 [M, K]) = dy (W ⊙ M) for M <= kGemvMaxRows (AVX512-BF16).
void dx_bf16dp(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits,
               at::Tensor& dx);

// ---- small_m.cpp (float32)
// The fp32 backward's route for few rows ($LASS_SPARSE_CPU_SMALL_BWD_MAX_M; 0: off). Against the
// decode -> BLAS tiles, 2 threads, one run each (64x64, 512x512, 2048x512, 1024x4096): M = 1
// dx 2.8 / 2.2 / 1.5 / 2.1x and dW 3.0 / 2.1 / 1.6 / 1.9x faster; M = 4 dx 2.5 / 1.3 / 1.0 /
// 1.6x, dW 2.5 / 1.2 / 1.5 / 1.2x. With dx's rows held in registers and dW's x loads shared by
// 4 weight rows (2 threads, median of 7, two runs, µs, tiles -> small_m): M = 8 dx 15.9 / 114 /
// 450 / 1422 -> 9.2-10.4 / 47-51 / 224-255 / 921-933, dW 16.7 / 74 / 271 / 969 -> 9.9-10.8 /
// 58-62 / 223-238 / 713-726; M = 16 dx 15.7 / 127 / 515 / 1634 -> 11-12 / 83 / 359-399 /
// 1373-1487, dW 16.5 / 73 / 332 / 1187 -> 10-12 / 77-80 / 307-328 / 1108-1403 (a tie at 512²).
constexpr int64_t kSmallBwdMaxRows = 16;
// Multiply-adds a thread must get before small_m.cpp splits its work (else one task, inline).
constexpr int64_t kSmallBwdMinWork = 1 << 16;
// dx (fp32 [M, K]) = dy (W ⊙ M), one pass over W with masked loads, no W tile, no GEMM.
void dx_small_m(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits,
                at::Tensor& dx);
// dw (fp32 [N, K]) = (dyᵀ x) ⊙ M, or dw += ... on mask-1 entries only (accumulate).
void dw_small_m(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits,
                at::Tensor& dw, bool accumulate);

// ---- panel_bf16.cpp (AVX512-BF16)
// dw (bf16 [N, K]) = (dyᵀ x) ⊙ M for dy [M, N], x [M, K]; off-mask entries exactly 0.
void dw_panel_bf16(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits,
                   at::Tensor& dw);
// dx (bf16 [M, K]) = dy (W ⊙ M) for dy [M, N], W [N, K].
void dx_panel_bf16(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits,
                   at::Tensor& dx);

// ---- amx_bf16.cpp (AMX-BF16; callers check has_amx_bf16(), bf16 2-D contiguous inputs)
// The CPU has AMX-BF16 tiles, the OS lets this process use them (Linux: arch_prctl
// ARCH_REQ_XCOMP_PERM), and $LASS_SPARSE_CPU_AMX is not 0 (read at each call).
bool has_amx_bf16();
// The row range in which the bf16 forward, dx and dW take the AMX kernels: from
// $LASS_SPARSE_CPU_AMX_MIN_M (5; fewer rows: the AVX512-BF16 kernels, which read W once at
// memory speed; dW at K > 2048 from 1 row) to $LASS_SPARSE_CPU_AMX_MAX_M (512; more rows: the
// decode -> BLAS tiles, where the GEMM dominates and oneDNN's blocking beats ours).
int64_t amx_min_rows();
int64_t amx_max_rows();
// y (bf16 [M, N]) = x (W ⊙ M)ᵀ (+ bias).
void forward_amx(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                 const c10::optional<at::Tensor>& bias, at::Tensor& y);
// The segmented forward (see tiled_segments), bf16: each strip of W packed once per pair change.
void segments_amx(const at::Tensor& x, const at::Tensor& w, const int32_t* bits,
                  int64_t bank_stride, const int64_t* offs, const int64_t* pid, int64_t segs,
                  const c10::optional<at::Tensor>& bias, at::Tensor& y);
// dx (bf16 [M, K]) = dy (W ⊙ M).
void dx_amx(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits, at::Tensor& dx);
// dst = (dyᵀ x) ⊙ M (dst bf16 or fp32; off-mask entries exactly 0), or dst (fp32) += it on the
// mask only (accumulate). dy, x bf16.
void dw_amx(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits, at::Tensor& dst,
            bool accumulate);
// The segmented dW, bf16: dst (bf16 or fp32) = Σ_s (dy_sᵀ x_s) ⊙ M_pid[s], each 32x32 block
// summed over the segments in fp32 and stored once.
void segments_dw_amx(const at::Tensor& dy, const at::Tensor& x, const int32_t* bits,
                     int64_t bank_stride, const int64_t* offs, const int64_t* pid, int64_t segs,
                     at::Tensor& dst);

// ---- panel_fp32.cpp (AVX-512)
// panel_segments: see tiled_segments; fp32 only.
void panel_segments(const at::Tensor& x, const at::Tensor& w, const int32_t* bits,
                    int64_t bank_stride, const int64_t* offs, const int64_t* pid, int64_t segs,
                    const c10::optional<at::Tensor>& bias, at::Tensor& y);

// ---- tiled.cpp (decode -> BLAS)
// y[offs[s]:offs[s+1], :] = x[offs[s]:offs[s+1], :] @ (W ⊙ M_pid[s])ᵀ (+ bias) per segment s;
// M_p's bits start at bits + p * bank_stride. `scale` widens the tiles, `floor` sets kMinTile.
void tiled_segments(const at::Tensor& x, const at::Tensor& w, const int32_t* bits,
                    int64_t bank_stride, const int64_t* offs, const int64_t* pid, int64_t segs,
                    const c10::optional<at::Tensor>& bias, at::Tensor& y, int64_t scale,
                    bool floor = false);
// dx [M, K] = dy [M, N] @ (W ⊙ M), column tiles of W ⊙ M.
void dx_tiles(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits, at::Tensor& dx);
// rows of dW (dtype of `dst`) = dyᵀ x, then ⊙ M (or += under the mask when accumulate).
void dw_tiles(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits, at::Tensor& dst,
              bool accumulate);

// ---- masked_linear.cpp (the op-level kernels: checks, then a family above)
at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                         const c10::optional<at::Tensor>& bias);
at::Tensor masked_linear_dx(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits);
at::Tensor masked_linear_dw(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits);
void masked_linear_dw_accumulate_(at::Tensor grad, const at::Tensor& dy, const at::Tensor& x,
                                  const at::Tensor& bits);

// ---- segmented.cpp
at::Tensor segmented_masked_linear(const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& bits_bank, const at::Tensor& seg_offsets,
                                   const at::Tensor& seg_pair,
                                   const c10::optional<at::Tensor>& bias);
}  // namespace lass_sparse_cpu
