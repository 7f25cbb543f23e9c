"""The ops as ``torch.library`` custom ops (DESIGN §3): one schema each in namespace
``lass_sparse``, its fake kernel (so ``torch.compile(fullgraph=True)`` traces it), and, where
differentiable, autograd registered once for all backends.

Dispatch keys, one kernel each (``torch._C._dispatch_dump("lass_sparse::<op>")``):

- ``CompositeExplicitAutograd``: the op's Python body (:mod:`.bodies`), for every device without
  a native kernel;
- ``CPU`` / ``CUDA``: the C++ entry where the extension is built (csrc/cpu, csrc/cuda/binding.cpp;
  csrc/common/entry.h). It defers to ``<op>.registry`` (the same schema, read from the op below,
  with the op's body as its one ``CompositeExplicitAutograd`` kernel) when another backend is
  forced or a call is not its own;
- ``Meta``: the fake kernel; ``Autograd``: the formulas below; ``ADInplaceOrView`` for the
  mutating ops (torch.library's own).

The fakes run the op's checks without the ones that read values (:mod:`.checks`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..bitmask import num_words
from . import bodies
from .checks import (
    check_accumulate,
    check_adamw,
    check_adamw_capturable,
    check_cast,
    check_dw,
    check_dx,
    check_linear,
    check_qkv,
    check_seg_dw,
    check_seg_dx,
    check_segmented,
    check_unpack,
)
from .direct import is_plain_eager, native_kernel, profiled
from .registry import NS

# --------------------------------------------------------------------------------- pack / unpack

pack_mask = torch.library.custom_op(f"{NS}::pack_mask", bodies.pack_mask_body, mutates_args=())


@pack_mask.register_fake
def _(mask):
    return mask.new_empty((*mask.shape[:-1], num_words(mask.shape[-1])), dtype=torch.int32)


unpack_mask = torch.library.custom_op(f"{NS}::unpack_mask", bodies.unpack_mask_body,
                                      mutates_args=())


@unpack_mask.register_fake
def _(bits, k):
    check_unpack(bits, k)
    return bits.new_empty((*bits.shape[:-1], k), dtype=torch.bool)


# -------------------------------------------------------------------------------- magnitude mask

magnitude_mask = torch.library.custom_op(f"{NS}::magnitude_mask", bodies.magnitude_mask_body,
                                         mutates_args=())


@magnitude_mask.register_fake
def _(weight, alpha):
    return weight.new_empty((*weight.shape[:-1], num_words(weight.shape[-1])), dtype=torch.int32)


# ---------------------------------------------------------------------------------- masked cast

masked_cast = torch.library.custom_op(f"{NS}::masked_cast", bodies.masked_cast_body,
                                      mutates_args=())


@masked_cast.register_fake
def _(weight, bits, dtype):
    check_cast(weight, bits, dtype)
    return weight.new_empty(weight.shape, dtype=dtype)


def cast_setup(ctx, inputs, output):
    weight, bits, dtype = inputs
    ctx.save_for_backward(bits)
    ctx.weight_dtype = weight.dtype


def cast_backward(ctx, grad):
    """The op is its own adjoint: dW = (grad ⊙ M) in the weight's dtype (off-mask exactly 0)."""
    (bits,) = ctx.saved_tensors
    if not torch.is_grad_enabled() and is_plain_eager(grad, bits):
        kernel = cast_kernel(grad.device.type)
        return profiled("masked_cast", kernel, grad.contiguous(), bits, ctx.weight_dtype), \
            None, None
    return torch.ops.lass_sparse.masked_cast(grad, bits, ctx.weight_dtype), None, None


masked_cast.register_autograd(cast_backward, setup_context=cast_setup)


# --------------------------------------------------------------------------------- masked linear

masked_linear = torch.library.custom_op(f"{NS}::masked_linear", bodies.masked_linear_body,
                                        mutates_args=())


@masked_linear.register_fake
def _(x, weight, bits, bias):
    check_linear("masked_linear", x, weight, bits, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


masked_linear_dx = torch.library.custom_op(f"{NS}::masked_linear_dx",
                                           bodies.masked_linear_dx_body, mutates_args=())


@masked_linear_dx.register_fake
def _(grad_out, weight, bits):
    check_dx("masked_linear_dx", grad_out, weight, bits)
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1]))


masked_linear_dw = torch.library.custom_op(f"{NS}::masked_linear_dw",
                                           bodies.masked_linear_dw_body, mutates_args=())


@masked_linear_dw.register_fake
def _(grad_out, x, bits):
    check_dw("masked_linear_dw", grad_out, x, bits)
    return x.new_empty((grad_out.shape[1], x.shape[1]))


masked_linear_dw_accumulate_ = torch.library.custom_op(
    f"{NS}::masked_linear_dw_accumulate_", bodies.dw_accumulate_body, mutates_args=("grad",))


@masked_linear_dw_accumulate_.register_fake
def _(grad, grad_out, x, bits):
    check_accumulate(grad, grad_out, x, bits)
    return None


def _grad_op(op: str, body, *args: Tensor) -> Tensor:
    """A backward pass's dx or dW: ``body`` directly in a plain eager backward (no graph built
    for double backward; on CPU the op's C++ kernel), else through
    ``torch.ops.lass_sparse.<op>``."""
    if not torch.is_grad_enabled() and is_plain_eager(*args):
        return profiled(op, GRAD_NATIVE.get((args[0].device.type, op), body), *args)
    return getattr(torch.ops.lass_sparse, op)(*args)


def grad_dx(dy: Tensor, weight: Tensor, bits: Tensor) -> Tensor:
    return _grad_op("masked_linear_dx", bodies.masked_linear_dx_body, dy, weight, bits)


def grad_dw(dy: Tensor, x: Tensor, bits: Tensor) -> Tensor:
    return _grad_op("masked_linear_dw", bodies.masked_linear_dw_body, dy, x, bits)


def ml_setup(ctx, inputs, output):
    x, weight, bits, bias = inputs
    ctx.save_for_backward(x, weight, bits)
    ctx.has_bias = bias is not None


def ml_backward(ctx, grad):
    x, weight, bits = ctx.saved_tensors
    n, k = weight.shape
    m = math.prod(x.shape[:-1])
    dy = grad.reshape(m, n)  # explicit sizes: N or K may be 0
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = grad_dx(dy, weight, bits).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        dw = grad_dw(dy, x.reshape(m, k), bits)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = dy.sum(0)
    return dx, dw, None, db


masked_linear.register_autograd(ml_backward, setup_context=ml_setup)


# ------------------------------------------------------------------------ segmented (mixed pairs)

segmented_masked_linear = torch.library.custom_op(
    f"{NS}::segmented_masked_linear", bodies.segmented_masked_linear_body, mutates_args=())


@segmented_masked_linear.register_fake
def _(x, weight, bits_bank, seg_offsets, seg_pair, bias):
    check_segmented("segmented_masked_linear", x, weight, bits_bank, seg_offsets, seg_pair, bias,
                    values=False)
    return x.new_empty((x.shape[0], weight.shape[0]))


segmented_masked_linear_dx = torch.library.custom_op(
    f"{NS}::segmented_masked_linear_dx", bodies.segmented_masked_linear_dx_body, mutates_args=())


@segmented_masked_linear_dx.register_fake
def _(grad_out, weight, bits_bank, seg_offsets, seg_pair):
    check_seg_dx(grad_out, weight, bits_bank, seg_offsets, seg_pair, values=False)
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1]))


segmented_masked_linear_dw = torch.library.custom_op(
    f"{NS}::segmented_masked_linear_dw", bodies.segmented_masked_linear_dw_body, mutates_args=())


@segmented_masked_linear_dw.register_fake
def _(grad_out, x, bits_bank, seg_offsets, seg_pair):
    check_seg_dw(grad_out, x, bits_bank, seg_offsets, seg_pair, values=False)
    return x.new_empty((bits_bank.shape[1], x.shape[1]))


def seg_setup(ctx, inputs, output):
    x, weight, bits_bank, seg_offsets, seg_pair, bias = inputs
    ctx.save_for_backward(x, weight, bits_bank, seg_offsets, seg_pair)
    ctx.has_bias = bias is not None


def seg_backward(ctx, grad):
    x, weight, bank, offs, pair = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = _grad_op("segmented_masked_linear_dx", bodies.segmented_masked_linear_dx_body, grad,
                      weight, bank, offs, pair)
    if ctx.needs_input_grad[1]:
        dw = _grad_op("segmented_masked_linear_dw", bodies.segmented_masked_linear_dw_body, grad,
                      x, bank, offs, pair)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        db = grad.sum(0)
    return dx, dw, None, None, None, db


segmented_masked_linear.register_autograd(seg_backward, setup_context=seg_setup)


# ---------------------------------------------------------------------------- fused QKV projection

masked_qkv_proj = torch.library.custom_op(f"{NS}::masked_qkv_proj", bodies.masked_qkv_proj_body,
                                          mutates_args=())


@masked_qkv_proj.register_fake
def _(x, weight, bits, bias, num_heads):
    check_qkv(x, weight, bits, bias, num_heads)
    b, t, d = x.shape
    shape = (b, num_heads, t, d // num_heads)
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)


def qkv_setup(ctx, inputs, output):
    x, weight, bits, bias, num_heads = inputs
    ctx.save_for_backward(x, weight, bits)
    ctx.has_bias = bias is not None


def qkv_backward(ctx, dq, dk, dv):
    x, weight, bits = ctx.saved_tensors
    b, t, d = x.shape
    # [B, H, T, Dh] x3 -> [B*T, 3D] in the weight's row order (q rows, k rows, v rows).
    dy = torch.stack([dq, dk, dv], 0).permute(1, 3, 0, 2, 4).reshape(b * t, 3 * d)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = grad_dx(dy, weight, bits).reshape(b, t, d)
    if ctx.needs_input_grad[1]:
        dw = grad_dw(dy, x.reshape(b * t, d), bits)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = dy.sum(0)
    return dx, dw, None, db, None


masked_qkv_proj.register_autograd(qkv_backward, setup_context=qkv_setup)


# ----------------------------------------------------------------------------------- masked AdamW

masked_adamw_ = torch.library.custom_op(
    f"{NS}::masked_adamw_", bodies.masked_adamw_body,
    mutates_args=("params", "exp_avgs", "exp_avg_sqs"),
)


@masked_adamw_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps, weight_decay, step,
      maximize):
    check_adamw(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps, weight_decay,
                step, real=False)
    return None


masked_adamw_capturable_ = torch.library.custom_op(
    f"{NS}::masked_adamw_capturable_", bodies.masked_adamw_capturable_body,
    mutates_args=("params", "exp_avgs", "exp_avg_sqs"),
)


@masked_adamw_capturable_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, bits, state_steps, lr, beta1, beta2, eps,
      weight_decay, maximize):
    check_adamw_capturable(params, grads, exp_avgs, exp_avg_sqs, bits, state_steps, lr, beta1,
                           beta2, eps, weight_decay, real=False)
    return None


# ------------------------------------------------------------------- native kernels' deferral

# Ops whose C++ kernels register under the public name (csrc/common/entry.h). Such a kernel
# defers to ``lass_sparse::<op>.registry``, the op's own schema (read from the op, not written
# again) with its Python body, when another backend is forced or it refuses the inputs: the body
# words the error, or the registry picks a backend that takes them (e.g. the reference for
# float16). Called only from those kernels, below autograd.
NATIVE_BODIES = {
    "pack_mask": bodies.pack_mask_body,
    "masked_cast": bodies.masked_cast_body,
    "unpack_mask": bodies.unpack_mask_body,
    "magnitude_mask": bodies.magnitude_mask_body,
    "masked_linear": bodies.masked_linear_body,
    "masked_linear_dx": bodies.masked_linear_dx_body,
    "masked_linear_dw": bodies.masked_linear_dw_body,
    "masked_linear_dw_accumulate_": bodies.dw_accumulate_body,
    "segmented_masked_linear": bodies.segmented_masked_linear_body,
    "segmented_masked_linear_dx": bodies.segmented_masked_linear_dx_body,
    "segmented_masked_linear_dw": bodies.segmented_masked_linear_dw_body,
    "masked_qkv_proj": bodies.masked_qkv_proj_body,
    "masked_adamw_": bodies.masked_adamw_body,
}
_REGISTRY_LIB = torch.library.Library(NS, "FRAGMENT")
for _name, _body in NATIVE_BODIES.items():
    _schema = str(getattr(torch.ops.lass_sparse, _name).default._schema)
    _REGISTRY_LIB.define(f"{_name}.registry(" + _schema.split("(", 1)[1])
    _REGISTRY_LIB.impl(f"{_name}.registry", _body, "CompositeExplicitAutograd")

# masked_cast's no-grad kernels by device type (C++ entries on CPU and CUDA; defined after the
# `.registry` overloads they defer to).
CAST_NATIVE = {dev: native_kernel("masked_cast", dev.upper()) for dev in ("cpu", "cuda")}


def cast_kernel(device_type: str):
    """masked_cast's no-grad kernel for a device type: the C++ entry, else the op body."""
    return CAST_NATIVE.get(device_type, bodies.masked_cast_body)

# A plain eager backward's dx / dW kernels on CPU and CUDA tensors (the C++ entries, below
# autograd; they defer to the op body for calls they do not take).
GRAD_NATIVE = {(dev, op): native_kernel(op, dev.upper()) for dev in ("cpu", "cuda")
               for op in ("masked_linear_dx", "masked_linear_dw")}


# --------------------------------------------------------------------------------- FLOP counts

def _flops(rows_of: int, n_of, k_of):
    """A FlopCounterMode formula: 2 × rows × N × K, the dense product's multiply-adds (the
    kernels skip no work where the mask is 0), from argument shapes: ``rows_of`` the argument
    whose leading dims are the rows, ``n_of`` / ``k_of`` (argument, dim) of N and K."""
    def formula(*shapes, out_shape=None, **kwargs):
        rows = math.prod(shapes[rows_of][:-1])
        return 2 * rows * shapes[n_of[0]][n_of[1]] * shapes[k_of[0]][k_of[1]]

    return formula


def _register_flop_formulas() -> None:
    """So ``torch.utils.flop_counter.FlopCounterMode`` (and MFU tools built on it) count the
    masked matmuls as it counts ``aten.mm``."""
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # pragma: no cover - older torch
        return
    ops = torch.ops.lass_sparse
    for op, f in (
        (ops.masked_linear, _flops(0, (1, 0), (1, 1))),  # x [.., K], W [N, K]
        (ops.masked_linear_dx, _flops(0, (1, 0), (1, 1))),  # dy [.., N], W [N, K]
        (ops.masked_linear_dw, _flops(0, (0, -1), (1, -1))),  # dy [M, N], x [M, K]
        (ops.masked_linear_dw_accumulate_, _flops(1, (1, -1), (2, -1))),  # grad, dy, x
        (ops.segmented_masked_linear, _flops(0, (1, 0), (1, 1))),
        (ops.segmented_masked_linear_dx, _flops(0, (1, 0), (1, 1))),
        (ops.segmented_masked_linear_dw, _flops(0, (0, -1), (1, -1))),
        (ops.masked_qkv_proj, _flops(0, (1, 0), (1, 1))),  # x [B, T, D], W [3D, D]
    ):
        register_flop_formula(op)(f)


_register_flop_formulas()
