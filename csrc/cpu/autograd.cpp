// The eager training node of lass_sparse.masked_linear, for every device: forward, dx, dW and
// the bias sum as one C++ autograd node (no Python autograd.Function, no per-call Python).
// The three products go through the dispatcher under the public names (lass_sparse::
// masked_linear, _dx, _dw), below autograd: the CPU entries (csrc/cpu) and the CUDA entries
// (csrc/cuda/binding.cpp) run their kernels there, and every call they do not take reaches
// the op's Python body (its checks, then the backend registry), exactly as the op path.
// x is 2-D [M, K]; lass_sparse/ops/eager.py reshapes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

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
    static const auto dx_op = public_op<GradSig>("lass_sparse::masked_linear_dx");
    static const auto dw_op = public_op<GradSig>("lass_sparse::masked_linear_dw");
    // dx and dW come from kernels, not from differentiable ops: refuse a graph of the gradient
    // rather than return one that silently ends here.
    LASS_CHECK(!at::GradMode::is_enabled(),
               "masked_linear: double backward (create_graph=True) is not supported");
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto& bits = saved[2];
    const auto dy = grads[0].contiguous();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) dx = dx_op.call(dy, w, bits);
    if (ctx->needs_input_grad(1)) dw = dw_op.call(dy, x, bits);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) db = dy.sum(0);
    return {dx, dw, at::Tensor(), db};
  }
};

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
}
