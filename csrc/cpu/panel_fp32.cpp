// fp32 panel GEMM (AVX-512): segments of x against decoded tiles of W, without BLAS.
// x is packed once per call into panels of 32 rows, k-major (panel[k][j] = x[row0 + j][k], zero
// past the segment's end), so no panel mixes two segments (two pairs). A tile of W's rows is
// decoded (W ⊙ M_p, row-major) into an L2-sized buffer once per pair change, as in
// tiled_segments, and a 6 x 32 register tile (6 W rows broadcast, 2 x 16 panel columns) runs the
// whole K: 12 FMAs per 2 panel loads and 6 broadcasts. One core, K = 512-2048, operands in L2:
// 115 GFLOP/s (MR = 4: 85, MR = 12: 70-91); the BLAS GEMM torch calls reached about 90 on the
// dense single-pair shape. Per-segment BLAS calls repack the decoded tile for every 32-row
// segment and ran 16 pairs at 1.25-1.6x dense (benchmarks/test_segmented.py); the panel kernel
// 0.90-1.17x (2 threads, one run).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "linear.h"

namespace lass_sparse_cpu {

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

// y[rows, c0 + i] = out[i][j] (+ bias) for the `rows` valid panel rows starting at y row m0,
// over a block of kc columns of K (the decoded rows' stride ldw); added to y after the first.
template <int MR>
static void panel_block(const float* wd, int64_t ldw, const float* panel, int64_t kc,
                        int64_t rows, const float* bias, bool first, float* y, int64_t n,
                        int64_t m0, int64_t c0) {
  alignas(64) float out[kPanelMR * kPanelRows];
  if (rows <= 16)
    panel_kernel<MR, 1>(wd, ldw, panel, kc, out);
  else
    panel_kernel<MR, 2>(wd, ldw, panel, kc, out);
  for (int64_t j = 0; j < rows; ++j) {
    float* yr = y + (m0 + j) * n + c0;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
      yr[i] = out[i * kPanelRows + j] + (first ? (bias ? bias[c0 + i] : 0.f) : yr[i]);
  }
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
// kernel instead of a BLAS call per segment. K runs in blocks of kc columns (the outer loop of
// each thread), so the panels' kc columns (<= ~1 MB) stay in L2 while every W tile passes: with
// the whole K at once, 512 rows x K = 4096 (8 MB of panels) streamed from L3 for every tile
// (1.8x dense on a 2-core Xeon, 1.15x in blocks).
void panel_segments(const at::Tensor& x, const at::Tensor& w, const int32_t* bits,
                    int64_t bank_stride, const int64_t* offs, const int64_t* pid,
                    int64_t segs, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t k = x.size(1), n = w.size(0);
  at::Tensor packed;
  const std::vector<Panel> panels = pack_panels(x.data_ptr<float>(), k, offs, segs, packed);
  const int64_t np = static_cast<int64_t>(panels.size());
  // kc: ~1 MB of panels (a multiple of 32: mask words stay whole), the whole K when it fits
  int64_t kc = std::max<int64_t>(128, (1024 * 1024 / (4 * kPanelRows * std::max<int64_t>(np, 1)))
                                          / 32 * 32);
  if (kc >= k) kc = k;
  // a decoded tile of at most ~256 KB (L2 holds it beside a panel), whole register tiles
  int64_t tn = std::max<int64_t>(kPanelMR, (256 * 1024 / (4 * kc)) / kPanelMR * kPanelMR);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t share = (n + 2 * threads - 1) / (2 * threads);  // >= 2 tiles per thread
  tn = std::min(tn, std::max<int64_t>(kPanelMR, (share + kPanelMR - 1) / kPanelMR * kPanelMR));
  const int64_t tiles = (n + tn - 1) / tn;
  const float* wp = w.data_ptr<float>();
  const float* pp = packed.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<float[]> buf(new float[static_cast<size_t>(tn * kc)]);  // not zeroed
    for (int64_t k0 = 0; k0 < k; k0 += kc) {
      const int64_t kw = std::min(kc, k - k0);
      const bool first = k0 == 0;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tn, r1 = std::min(n, r0 + tn);
        int64_t decoded = -1;
        for (int64_t p = 0; p < np; ++p) {
          const Panel& pn = panels[p];
          if (pid[pn.seg] != decoded) {
            decode_block(wp, bits + pid[pn.seg] * bank_stride, k, r0, r1, k0, kw, buf.get());
            decoded = pid[pn.seg];
          }
          const float* panel = pp + p * k * kPanelRows + k0 * kPanelRows;
          const float* wd = buf.get();
          int64_t r = r0;
          for (; r + kPanelMR <= r1; r += kPanelMR)
            panel_block<kPanelMR>(wd + (r - r0) * kw, kw, panel, kw, pn.rows, bp, first, yp, n,
                                  pn.row0, r);
          const float* wr = wd + (r - r0) * kw;
          switch (r1 - r) {  // the tile's last rows
            case 5: panel_block<5>(wr, kw, panel, kw, pn.rows, bp, first, yp, n, pn.row0, r); break;
            case 4: panel_block<4>(wr, kw, panel, kw, pn.rows, bp, first, yp, n, pn.row0, r); break;
            case 3: panel_block<3>(wr, kw, panel, kw, pn.rows, bp, first, yp, n, pn.row0, r); break;
            case 2: panel_block<2>(wr, kw, panel, kw, pn.rows, bp, first, yp, n, pn.row0, r); break;
            case 1: panel_block<1>(wr, kw, panel, kw, pn.rows, bp, first, yp, n, pn.row0, r); break;
            default: break;
          }
        }
      }
    }
  });
}

}  // namespace lass_sparse_cpu
