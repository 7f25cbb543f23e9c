// Fused masked linear on the CPU: y = x @ (W ⊙ M)ᵀ + b, dx = dy @ (W ⊙ M), dW = (dyᵀ x) ⊙ M.
// W ⊙ M is never materialised whole. This file checks the arguments and picks a kernel family
// per dtype and row count (linear.h lists them):
//  * small M (decode, M <= kGemvMaxRows): gemv.cpp, dx_bf16dp.cpp;
//  * bf16 backward up to ~128 rows with AVX512-BF16: panel_bf16.cpp;
//  * fp32 forward with AVX-512: panel_fp32.cpp;
//  * otherwise decode -> BLAS, one cache-sized tile of W ⊙ M at a time: tiled.cpp.
// It also holds the entries under the public names (the autograd node: autograd.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include <tuple>

#include "linear.h"

namespace lass_sparse_cpu {

static void check_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                         const char* op) {
  check_float_2d(x, op, "x");
  check_float_2d(w, op, "weight");
  LASS_CHECK(x.size(1) == w.size(1), op, ": x must be [M, K] and weight [N, K], got ",
              x.sizes(), " and ", w.sizes());
  LASS_CHECK(x.scalar_type() == w.scalar_type(), op, ": x and weight dtypes differ (",
              x.scalar_type(), ", ", w.scalar_type(), ")");
  check_bits(bits, {w.size(0)}, w.size(1), op);
}

static at::Tensor tiled_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                                const c10::optional<at::Tensor>& bias) {
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  const int64_t offs[2] = {0, x.size(0)}, pid[1] = {0};
  // fp32, 2 threads, against F.linear (one run), 2048x512 to 4096x4096. EPYC: M=32 0.68-0.80x
  // (BLAS tiles 0.83-1.03x), M=128 0.78-0.98x (0.92-1.08x), M=512 0.82-1.09x (0.92-1.08x).
  // Xeon (AMX machine, paired): M=32 0.98-1.06x (1.27-1.44x), M=128 1.16-1.38x (1.20-1.29x),
  // M=512 1.33-1.69x (1.15-1.20x). So the panel up to $LASS_SPARSE_CPU_PANEL_MAX_M rows (128).
  static const int64_t panel_max_m = env_int("LASS_SPARSE_CPU_PANEL_MAX_M", 128);
  if (x.scalar_type() == at::kFloat && x.size(0) <= panel_max_m && has_avx512() &&
      panel_gemm_enabled()) {
    panel_segments(x, w, bits.data_ptr<int32_t>(), 0, offs, pid, 1, bias, y);
    return y;
  }
  // Each tile's GEMM repacks all of x: at least kMinTile rows (or a thread's share) above the
  // GEMV range, as in the backward (fp32 M=512 4096x4096: 32-row tiles were 1.17x dense).
  tiled_segments(x, w, bits.data_ptr<int32_t>(), 0, offs, pid, 1, bias, y, 1,
                 x.size(0) > kWideTileMaxM);
  return y;
}

// bf16 rows (x for the forward and dW, grad_out for dx) that the AMX kernels take: from
// amx_min_rows() (or any count when `any_rows`) up to amx_max_rows() rows.
static bool use_amx(const at::Tensor& rows, bool any_rows = false) {
  return rows.scalar_type() == at::kBFloat16 && (any_rows || rows.size(0) >= amx_min_rows()) &&
         rows.size(0) <= amx_max_rows() && has_amx_bf16();
}

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                         const c10::optional<at::Tensor>& bias) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear(x, w, bits, "masked_linear");
  if (bias.has_value()) check_exact(*bias, "masked_linear", "bias", w.scalar_type(), {w.size(0)});
  if (x.size(0) == 0 || w.size(0) == 0 || w.size(1) == 0) {
    auto y = at::zeros({x.size(0), w.size(0)}, x.options());
    if (bias.has_value() && x.size(0)) y.add_(*bias);
    return y;
  }
  if (use_amx(x)) {
    auto y = at::empty({x.size(0), w.size(0)}, x.options());
    forward_amx(x, w, bits, bias, y);
    return y;
  }
  if (x.size(0) <= gemv_max_rows(w.scalar_type())) return gemv(x, w, bits, bias);
  return tiled_forward(x, w, bits, bias);
}

// fp32 rows up to which dx and dW take small_m.cpp ($LASS_SPARSE_CPU_SMALL_BWD_MAX_M; 0: off).
static int64_t small_bwd_max_m() {
  static const int64_t v =
      std::min<int64_t>(env_int("LASS_SPARSE_CPU_SMALL_BWD_MAX_M", kSmallBwdMaxRows), 1 << 20);
  return v;
}

at::Tensor masked_linear_dx(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_float_2d(w, "masked_linear_dx", "weight");
  check_float_2d(dy, "masked_linear_dx", "grad_out");
  LASS_CHECK(dy.size(1) == w.size(0) && dy.scalar_type() == w.scalar_type(),
              "masked_linear_dx: grad_out must be ", w.scalar_type(), "[M, N=", w.size(0),
              "], got ", dy.scalar_type(), dy.sizes());
  check_bits(bits, {w.size(0)}, w.size(1), "masked_linear_dx");
  const int64_t m_rows = dy.size(0), n = w.size(0), k = w.size(1);
  auto dx = at::empty({m_rows, k}, dy.options());
  if (m_rows == 0 || k == 0) return dx;
  if (n == 0) return dx.zero_();
  static const int64_t dp_max_m =
      std::min<int64_t>(env_int("LASS_SPARSE_CPU_DX_DP_MAX_M", kDxDotMaxRows), kGemvMaxRows);
  // most rows for the bf16 dot-product backward kernels (panel_bf16.cpp)
  static const int64_t panel_max_m = env_int("LASS_SPARSE_CPU_PANEL_DX_MAX_M", 128);
  if (use_amx(dy)) {
    dx_amx(dy, w, bits, dx);
    return dx;
  }
  if (dy.scalar_type() == at::kBFloat16 && m_rows <= dp_max_m && has_avx512_bf16()) {
    dx_bf16dp(dy, w, bits, dx);
    return dx;
  }
  // 1 thread, best of 30 against dy @ W (decode -> BLAS in brackets), 2048x512 to 4096x4096:
  // M=16 0.86-1.27x (1.23-1.49x), M=64 1.04-1.20x (1.13-1.43x).
  if (dy.scalar_type() == at::kBFloat16 && m_rows <= panel_max_m &&
      has_avx512_bf16() && panel_gemm_enabled()) {
    dx_panel_bf16(dy, w, bits, dx);
    return dx;
  }
  if (dy.scalar_type() == at::kFloat && m_rows <= small_bwd_max_m()) {
    dx_small_m(dy, w, bits, dx);
    return dx;
  }
  dx_tiles(dy, w, bits, dx);
  return dx;
}

// grad_out [M, N] and x [M, K] (contiguous, floating, CPU) and bits int32[N, ceil(K/32)].
static void check_dw_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits,
                          const char* op) {
  check_float_2d(dy, op, "grad_out");
  check_float_2d(x, op, "x");
  LASS_CHECK(dy.size(0) == x.size(0), op, ": grad_out [M, N] and x [M, K] must have the same M, "
              "got ", dy.sizes(), " and ", x.sizes());
  check_bits(bits, {dy.size(1)}, x.size(1), op);
}

at::Tensor masked_linear_dw(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dw_args(dy, x, bits, "masked_linear_dw");
  LASS_CHECK(dy.scalar_type() == x.scalar_type(),
              "masked_linear_dw: grad_out and x dtypes differ (", dy.scalar_type(), ", ",
              x.scalar_type(), ")");
  auto dw = at::empty({dy.size(1), x.size(1)}, x.options());
  if (dw.numel() == 0) return dw;
  if (x.size(0) == 0) return dw.zero_();
  // Against dyᵀ x, 2 threads, K <= 2048 (BLAS + mask pass in brackets): M=4 0.51-0.85x
  // (1.38-1.56x), M=8 0.95-1.15x (1.39-1.66x), M=16 0.86-1.00x (1.26-1.33x), M=64 0.85-0.98x;
  // at K = 4096 worse (M=16 1.25x against 1.05x: a 32 MB result, page faults on both sides).
  static const int64_t panel_max_m = env_int("LASS_SPARSE_CPU_PANEL_DW_MAX_M", 128);
  if (use_amx(x, x.size(1) > 2048)) {  // the panel kernel takes K <= 2048 only
    dw_amx(dy, x, bits, dw, false);
    return dw;
  }
  if (x.scalar_type() == at::kBFloat16 && x.size(0) <= panel_max_m && x.size(1) <= 2048 &&
      has_avx512_bf16() && panel_gemm_enabled()) {
    dw_panel_bf16(dy, x, bits, dw);
    return dw;
  }
  if (x.scalar_type() == at::kFloat && x.size(0) <= small_bwd_max_m()) {
    dw_small_m(dy, x, bits, dw, false);
    return dw;
  }
  dw_tiles(dy, x, bits, dw, false);
  return dw;
}

void masked_linear_dw_accumulate_(at::Tensor grad, const at::Tensor& dy, const at::Tensor& x,
                                  const at::Tensor& bits) {
  // Nested ATen calls run below autograd: this kernel is the op's implementation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dw_args(dy, x, bits, "masked_linear_dw_accumulate_");
  check_float_2d(grad, "masked_linear_dw_accumulate_", "grad");
  LASS_CHECK(grad.size(0) == dy.size(1) && grad.size(1) == x.size(1),
              "masked_linear_dw_accumulate_: grad must be [N=", dy.size(1), ", K=", x.size(1),
              "], got ", grad.sizes());
  if (grad.numel() == 0 || x.size(0) == 0) return;
  // bf16 activations into an fp32 (master) grad on AMX: bf16 products, fp32 sums, no casts
  if (use_amx(x, x.size(1) > 2048) && dy.scalar_type() == at::kBFloat16 &&
      grad.scalar_type() == at::kFloat && grad.is_contiguous()) {
    dw_amx(dy, x, bits, grad, true);
    return;
  }
  // Accumulate in grad's dtype (fp32 master grads for bf16 activations).
  auto dy_c = dy.to(grad.scalar_type()).contiguous();
  auto x_c = x.to(grad.scalar_type()).contiguous();
  if (grad.scalar_type() == at::kFloat && x.size(0) <= small_bwd_max_m() && grad.is_contiguous()) {
    dw_small_m(dy_c, x_c, bits, grad, true);
    return;
  }
  dw_tiles(dy_c, x_c, bits, grad, true);
}

// ---- entries under the public names (entry.h): the op's normalisation (x [..., K] as rows,
// contiguous inputs), then the kernel, or the op's Python body

static at::Tensor masked_linear_op(const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& bits,
                                   const c10::optional<at::Tensor>& bias) {
  static const auto registry =
      registry_overload<decltype(masked_linear_op)>("lass_sparse::masked_linear");
  return run_or_defer(
      registry,
      [&] {
        // below autograd: the [..., N] result is a plain tensor, not a view (in-place ops on
        // it work under autograd, as after F.linear)
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const auto b = contiguous(bias);
        if (x.dim() == 2) return masked_linear(x.contiguous(), w.contiguous(), bits.contiguous(), b);
        LASS_CHECK(x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1),
                    "masked_linear: x must be [..., K] to match weight [N, K]");
        int64_t m_rows = 1;  // the product of the leading sizes (K may be 0)
        for (int64_t d = 0; d + 1 < x.dim(); ++d) m_rows *= x.size(d);
        auto y = masked_linear(x.reshape({m_rows, w.size(1)}).contiguous(), w.contiguous(),
                               bits.contiguous(), b);
        auto sizes = x.sizes().vec();
        sizes.back() = w.size(0);
        return y.view(sizes);
      },
      x, w, bits, bias);
}


static at::Tensor masked_linear_dx_op(const at::Tensor& dy, const at::Tensor& w,
                                      const at::Tensor& bits) {
  static const auto registry =
      registry_overload<decltype(masked_linear_dx_op)>("lass_sparse::masked_linear_dx");
  return run_or_defer(
      registry,
      [&] { return masked_linear_dx(dy.contiguous(), w.contiguous(), bits.contiguous()); }, dy,
      w, bits);
}

static at::Tensor masked_linear_dw_op(const at::Tensor& dy, const at::Tensor& x,
                                      const at::Tensor& bits) {
  static const auto registry =
      registry_overload<decltype(masked_linear_dw_op)>("lass_sparse::masked_linear_dw");
  return run_or_defer(
      registry,
      [&] { return masked_linear_dw(dy.contiguous(), x.contiguous(), bits.contiguous()); }, dy,
      x, bits);
}

static void masked_linear_dw_accumulate_op(const at::Tensor& grad, const at::Tensor& dy,
                                           const at::Tensor& x, const at::Tensor& bits) {
  static const auto registry = registry_overload<decltype(masked_linear_dw_accumulate_op)>(
      "lass_sparse::masked_linear_dw_accumulate_");
  run_or_defer(
      registry,
      [&] {
        // the op takes grad float32 or x's dtype; the kernel accumulates in grad's dtype
        LASS_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == x.scalar_type(),
                    "masked_linear_dw_accumulate_: grad must be float32 or x's dtype");
        LASS_CHECK(dy.scalar_type() == x.scalar_type(),
                    "masked_linear_dw_accumulate_: grad_out and x must share a dtype");
        masked_linear_dw_accumulate_(grad, dy.contiguous(), x.contiguous(), bits.contiguous());
      },
      grad, dy, x, bits);
}

// Fused QKV projection: x [B, T, D] @ (W ⊙ M)ᵀ (+ b) with W [3D, D] by the forward kernel,
// split into q, k, v [B, H, T, D/H] (fresh memory each: a custom op's outputs may not alias).
static std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_qkv_proj_op(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
    const c10::optional<at::Tensor>& bias, int64_t num_heads) {
  static const auto registry =
      registry_overload<decltype(masked_qkv_proj_op)>("lass_sparse::masked_qkv_proj");
  return run_or_defer(
      registry,
      [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        LASS_CHECK(x.dim() == 3, "masked_qkv_proj: x must be [B, T, D], got ", x.sizes());
        const int64_t b = x.size(0), t = x.size(1), d = x.size(2);
        LASS_CHECK(w.dim() == 2 && w.size(0) == 3 * d && w.size(1) == d,
                    "masked_qkv_proj: weight must be [3D, D] = [", 3 * d, ", ", d, "], got ",
                    w.sizes());
        LASS_CHECK(num_heads > 0 && d % num_heads == 0,
                    "masked_qkv_proj: num_heads must divide D=", d, ", got ", num_heads);
        const auto y = masked_linear(x.reshape({b * t, d}).contiguous(), w.contiguous(),
                                     bits.contiguous(), contiguous(bias));
        const auto y5 = y.view({b, t, 3, num_heads, d / num_heads}).permute({2, 0, 3, 1, 4});
        return {y5[0].clone(at::MemoryFormat::Contiguous),
                y5[1].clone(at::MemoryFormat::Contiguous),
                y5[2].clone(at::MemoryFormat::Contiguous)};
      },
      x, w, bits, bias, num_heads);
}

}  // namespace lass_sparse_cpu

TORCH_LIBRARY_IMPL(lass_sparse, CPU, m) {
  m.impl("masked_linear", &lass_sparse_cpu::masked_linear_op);
  m.impl("masked_linear_dx", &lass_sparse_cpu::masked_linear_dx_op);
  m.impl("masked_linear_dw", &lass_sparse_cpu::masked_linear_dw_op);
  m.impl("masked_linear_dw_accumulate_", &lass_sparse_cpu::masked_linear_dw_accumulate_op);
  m.impl("masked_qkv_proj", &lass_sparse_cpu::masked_qkv_proj_op);
}
