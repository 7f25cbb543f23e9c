// decode -> BLAS: one cache-sized tile of W ⊙ M (rows for y and dW, columns for dx) is decoded
// at a time into a per-thread buffer and handed to the BLAS GEMM (at::mm_out into the output
// slice). Tiles are spread over threads; each GEMM runs single-threaded.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "linear.h"

namespace lass_sparse_cpu {

// y[offs[s]:offs[s+1], :] = x[offs[s]:offs[s+1], :] @ (W ⊙ M_pid[s])ᵀ (+ bias) for every segment
// s; M_p's bits start at bits + p * bank_stride. Tiles of W's rows are the outer loop (spread over
// threads) and segments the inner one, so a tile of W is read from memory once and decoded once
// per pair change while it is cache-hot; each segment's rows then go through one GEMM.
void tiled_segments(const at::Tensor& x, const at::Tensor& w, const int32_t* bits,
                    int64_t bank_stride, const int64_t* offs, const int64_t* pid,
                    int64_t segs, const c10::optional<at::Tensor>& bias, at::Tensor& y,
                    int64_t scale, bool floor) {
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

// dx = dy @ (W ⊙ M) through column tiles of W ⊙ M: [N, kc] with kc a multiple of 32, so mask
// words stay aligned.
void dx_tiles(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits, at::Tensor& dx) {
  const int64_t m_rows = dy.size(0), n = w.size(0), k = w.size(1);
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
}

// rows [r0, r1) of dW (dtype of `dst`) = dy[:, r0:r1]ᵀ @ x, then ⊙ M (or += when accumulate).
void dw_tiles(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits,
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

}  // namespace lass_sparse_cpu
