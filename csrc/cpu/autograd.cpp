// The eager training nodes of lass_sparse.masked_linear, masked_qkv_proj and masked_cast, for
// every device: forward, dx, dW and the bias sum as one C++ autograd node (no Python
// autograd.Function).
// The products go through the dispatcher under the public names (lass_sparse::masked_linear,
// masked_qkv_proj, _dx, _dw), below autograd: the CPU entries (csrc/cpu) and the CUDA entries
// (csrc/cuda/binding.cpp) run their kernels there, and every call they do not take reaches
// the op's Python body (its checks, then the backend registry), exactly as the op path (the
// QKV forward on the CPU has no C++ kernel: its body runs). masked_linear's x is 2-D [M, K]
// (lass_sparse/ops/eager.py reshapes); masked_qkv_proj's [B, T, D].
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/message.h"

namespace lass_sparse_cpu {
namespace {

using LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&);
using GradSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);

// The op's default overload (defined by lass_sparse/ops/schema.py, imported before any call).
template <class Sig>
c10::TypedOperatorHandle<Sig> public_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// A node's backward products for dy [M, N] against its saved x2 [M, K], weight and bits: dx
// [M, K], dW and the bias grad, each only where needed (inputs 0, 1 and 3). dx and dW come from
// kernels, not from differentiable ops: refuse a graph of the gradient rather than return one
// that silently ends here.
std::array<at::Tensor, 3> linear_grads(torch::autograd::AutogradContext* ctx, const char* op,
                                       const at::Tensor& dy, const at::Tensor& x2,
                                       const at::Tensor& w, const at::Tensor& bits) {
  static const auto dx_op = public_op<GradSig>("lass_sparse::masked_linear_dx");
  static const auto dw_op = public_op<GradSig>("lass_sparse::masked_linear_dw");
  LASS_CHECK(!at::GradMode::is_enabled(), op,
             ": double backward (create_graph=True) is not supported");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  std::array<at::Tensor, 3> out;
  if (ctx->needs_input_grad(0)) out[0] = dx_op.call(dy, w, bits);
  if (ctx->needs_input_grad(1)) out[1] = dw_op.call(dy, x2, bits);
  if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) out[2] = dy.sum(0);
  return out;
}

struct MaskedLinearFn : public torch::autograd::Function<MaskedLinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w, const at::Tensor& bits,
                            const std::optional<at::Tensor>& bias) {
    static const auto linear = public_op<LinearSig>("lass_sparse::masked_linear");
    ctx->save_for_backward({x, w, bits});
    ctx->saved_data["has_bias"] = bias.has_value();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return linear.call(x, w, bits, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto g = linear_grads(ctx, "masked_linear", grads[0].contiguous(), saved[0], saved[1],
                                saved[2]);
    return {g[0], g[1], at::Tensor(), g[2]};
  }
};

using QkvSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    int64_t);

// The fused QKV projection's node: q, k, v [B, H, T, Dh] from the public op; backward
// regroups their grads into dy [B*T, 3D] in the weight's row order (q rows, k rows, v rows)
// for the public dx / dW ops, as the op's registered autograd (lass_sparse/ops/schema.py).
struct MaskedQKVFn : public torch::autograd::Function<MaskedQKVFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& x, const at::Tensor& w,
                                                const at::Tensor& bits,
                                                const std::optional<at::Tensor>& bias,
                                                int64_t num_heads) {
    static const auto qkv = public_op<QkvSig>("lass_sparse::masked_qkv_proj");
    ctx->save_for_backward({x, w, bits});
    ctx->saved_data["has_bias"] = bias.has_value();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto out = qkv.call(x, w, bits, bias, num_heads);
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const int64_t b = x.size(0), t = x.size(1), d = x.size(2);
    // [3, B, H, T, Dh] -> [B, T, 3, H, Dh] -> [B*T, 3D] (grads of unused outputs are zeros)
    const auto dy = at::stack({grads[0], grads[1], grads[2]}, 0)
                        .permute({1, 3, 0, 2, 4})
                        .reshape({b * t, 3 * d});
    auto g = linear_grads(ctx, "masked_qkv_proj", dy, x.reshape({b * t, d}), saved[1], saved[2]);
    if (g[0].defined()) g[0] = g[0].reshape({b, t, d});
    return {g[0], g[1], at::Tensor(), g[2], at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_qkv_autograd(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
    const std::optional<at::Tensor>& bias, int64_t num_heads) {
  // the node's contract (eager.py's call): x [B, T, D], weight [3D, D]; the op checks the rest
  LASS_CHECK(x.dim() == 3 && w.dim() == 2 && w.size(0) == 3 * x.size(2),
             "masked_qkv_autograd: x must be [B, T, D] and weight [3D, D], got ", x.sizes(),
             " and ", w.sizes());
  auto out = MaskedQKVFn::apply(x, w, bits, bias, num_heads);
  return {out[0], out[1], out[2]};
}

using CastSig = at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType);

// masked_cast's node: the op is its own adjoint, dW = masked_cast(grad, bits, W's dtype).
struct MaskedCastFn : public torch::autograd::Function<MaskedCastFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& w,
                            const at::Tensor& bits, at::ScalarType dtype) {
    static const auto cast = public_op<CastSig>("lass_sparse::masked_cast");
    ctx->save_for_backward({bits});
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(w.scalar_type());
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return cast.call(w, bits, dtype);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto cast = public_op<CastSig>("lass_sparse::masked_cast");
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    const auto bits = ctx->get_saved_variables()[0];
    // a linear op: with create_graph the public op records its own node (double backward)
    at::Tensor dw = at::GradMode::is_enabled()
                        ? cast.call(grads[0], bits, dtype)
                        : [&] {
                            at::AutoDispatchBelowADInplaceOrView below_autograd;
                            return cast.call(grads[0].contiguous(), bits, dtype);
                          }();
    return {dw, at::Tensor(), at::Tensor()};
  }
};

at::Tensor masked_cast_autograd(const at::Tensor& w, const at::Tensor& bits,
                                at::ScalarType dtype) {
  return MaskedCastFn::apply(w, bits, dtype);
}

at::Tensor masked_linear_autograd(const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& bits, const std::optional<at::Tensor>& bias) {
  // the node's contract (eager.py's call): 2-D rows, every tensor contiguous
  LASS_CHECK(x.dim() == 2, "masked_linear_autograd: x must be 2-D [M, K], got ", x.sizes());
  LASS_CHECK(x.is_contiguous() && w.is_contiguous() && bits.is_contiguous() &&
                 (!bias.has_value() || bias->is_contiguous()),
             "masked_linear_autograd: x, weight, bits and bias must be contiguous");
  return MaskedLinearFn::apply(x, w, bits, bias);
}

}  // namespace
}  // namespace lass_sparse_cpu

TORCH_LIBRARY_IMPL(lass_sparse_cpu, CompositeImplicitAutograd, m) {
  m.impl("masked_linear_autograd", &lass_sparse_cpu::masked_linear_autograd);
  m.impl("masked_qkv_autograd", &lass_sparse_cpu::masked_qkv_autograd);
  m.impl("masked_cast_autograd", &lass_sparse_cpu::masked_cast_autograd);
}
