"""The public functions (``lass_sparse.masked_linear``, ...): docstrings with shapes and dtypes,
and the direct eager path (:mod:`.direct`) where it applies; every other call goes through
``torch.ops.lass_sparse.<op>`` (:mod:`.schema`).

Shapes: ``x: [..., K]``, ``weight: [N, K]`` (``nn.Linear`` layout), ``bits: int32[N, ceil(K/32)]``;
any of M, N, K may be 0 (results as ``F.linear``).

Non-finite values: a masked-out weight is *not used* (a select, never ``W * M``), so NaN/Inf
stored off the mask never reaches y, dx or dW, and off-mask dW is exactly 0 whatever x and
grad_out hold. Non-finite x, grad_out, bias or on-mask weights propagate as in
``F.linear(x, where(M, W, 0), b)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from . import registry, schema
from .bodies import (
    masked_adamw_body,
    masked_adamw_capturable_body,
    masked_linear_body,
    masked_qkv_proj_body,
    segmented_masked_linear_body,
)
from .checks import check_cast, check_linear, check_qkv
from .direct import forward_direct, is_plain_eager, native_kernel, needs_grad, profiled

# ------------------------------------------------------------------------- masks and pruning


def pack_mask(mask: Tensor) -> Tensor:
    """Pack ``mask: bool[..., K]`` into ``int32[..., ceil(K/32)]`` (LSB first, zero padding)."""
    return torch.ops.lass_sparse.pack_mask(mask)


def unpack_mask(bits: Tensor, k: int) -> Tensor:
    """Unpack ``bits: int32[..., ceil(k/32)]`` into ``bool[..., k]``."""
    return torch.ops.lass_sparse.unpack_mask(bits, k)


def magnitude_mask(weight: Tensor, alpha: float) -> Tensor:
    """LaSS pruning rule: keep ``|w| > kthvalue(|w|.flatten(), int(alpha * numel))``.

    Returns packed bits ``int32[..., ceil(K/32)]`` for ``weight: [..., K]``. ``alpha`` is the
    fraction pruned, in ``[0, 1)``; when ``int(alpha * numel) == 0`` every entry is kept (zeros
    too). Ties: every entry equal to the threshold is pruned, so with repeated magnitudes more
    than ``int(alpha * numel)`` entries may be dropped — exactly as the original LaSS code.
    """
    return torch.ops.lass_sparse.magnitude_mask(weight, alpha)


# ---------------------------------------------------------------------------------- masked cast


class _MaskedCastFn(torch.autograd.Function):
    """The eager twin of masked_cast's registered autograd."""

    @staticmethod
    def forward(ctx, weight, bits, dtype):
        out = schema.cast_kernel(weight.device.type)(weight.contiguous(), bits, dtype)
        schema.cast_setup(ctx, (weight, bits, dtype), out)
        return out

    backward = staticmethod(schema.cast_backward)


def masked_cast(weight: Tensor, bits: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``(weight ⊙ M).to(dtype)`` in one pass: read ``weight: [..., K]`` and
    ``bits: int32[..., ceil(K/32)]``, write a new tensor of ``dtype`` (default: weight's).

    Off-mask entries are exactly 0 (a select: NaN/Inf stored off the mask never passes).
    Differentiable in ``weight``: the gradient is ``(grad ⊙ M)`` in weight's dtype, so the mask
    is applied again as the gradient is cast back. This is what :class:`~lass_sparse.MaskedLinear`
    runs under autocast when the weight's dtype is not autocast's: the cast autocast makes of a
    dense weight, with the mask applied in the same pass (the result is a transient of W's size
    in the autocast dtype, as autocast's own copy is).
    """
    dtype = weight.dtype if dtype is None else dtype
    if forward_direct(weight, bits):
        if needs_grad(weight):
            node = _train_op("masked_cast_autograd")
            if (node is not None and weight.device.type in ("cpu", "cuda")
                    and registry.forced_backend() is None):
                try:  # one C++ node, its forward and backward the op's kernels
                    return profiled("masked_cast", node, weight, bits, dtype)
                except (RuntimeError, ValueError, TypeError):
                    check_cast(weight, bits, dtype)  # the op's wording
                    raise
            return profiled("masked_cast", _MaskedCastFn.apply, weight, bits, dtype)
        kernel = schema.cast_kernel(weight.device.type)
        return profiled("masked_cast", kernel, weight.contiguous(), bits, dtype)
    return torch.ops.lass_sparse.masked_cast(weight, bits, dtype)


# --------------------------------------------------------------------------------- masked linear


class _MaskedLinearFn(torch.autograd.Function):
    """The eager twin of the op's registered autograd: same body, same backward."""

    @staticmethod
    def forward(ctx, x, weight, bits, bias):  # ctx-style: no per-call signature binding
        y = masked_linear_body(x, weight, bits, bias)
        schema.ml_setup(ctx, (x, weight, bits, bias), y)
        return y

    backward = staticmethod(schema.ml_backward)


@functools.cache
def _train_op(name: str = "masked_linear_autograd"):
    """``lass_sparse_cpu::<name>`` (csrc/cpu/autograd.cpp: masked_linear_autograd,
    masked_qkv_autograd) where the C++ extension is built, else None."""
    if not registry.status()["cpu"].active:
        return None
    return getattr(torch.ops.lass_sparse_cpu, name, None)


def _cpp_autograd(x: Tensor, weight: Tensor, bits: Tensor, bias: Tensor | None):
    """masked_linear with its gradient as one C++ autograd node (its forward, dx and dW reach
    the public ops' CPU/CUDA kernels through the dispatcher, or their bodies for calls the
    kernels do not take) for an unforced eager call on a CPU or CUDA tensor; None when the
    Python node must take it. Errors are worded by the op's checks."""
    op = _train_op()
    if (op is None or x.device.type not in ("cpu", "cuda") or weight.dim() != 2 or x.dim() < 1
            or x.shape[-1] != weight.shape[1] or registry.forced_backend() is not None):
        return None
    n, k = weight.shape
    x2 = (x if x.dim() == 2 else x.reshape(-1, k)).contiguous()
    try:
        y = op(x2, weight.contiguous(), bits.contiguous(),
               None if bias is None else bias.contiguous())
    except (RuntimeError, ValueError, TypeError, IndexError):
        check_linear("masked_linear", x, weight, bits, bias)
        raise
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


# The direct path's no-grad kernels by device type (C++ entries on CPU and CUDA; others: the body).
ML_NATIVE = {"cpu": native_kernel("masked_linear"), "cuda": native_kernel("masked_linear", "CUDA")}


def masked_linear(x: Tensor, weight: Tensor, bits: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y[..., N] = x[..., K] @ (weight ⊙ M)ᵀ + bias`` without materialising ``weight ⊙ M``.

    ``bits: int32[N, ceil(K/32)]`` is the packed mask. Differentiable in ``x``, ``weight`` and
    ``bias``: ``dx = dy @ (W ⊙ M)``, ``dW = (dyᵀ x) ⊙ M`` (off-mask entries exactly 0).
    """
    if forward_direct(x, weight, bits, bias):
        if needs_grad(x, weight, bias):
            y = profiled("masked_linear", _cpp_autograd, x, weight, bits, bias)
            if y is not None:
                return y
            return profiled("masked_linear", _MaskedLinearFn.apply, x, weight, bits, bias)
        body = ML_NATIVE.get(x.device.type, masked_linear_body)
        return profiled("masked_linear", body, x, weight, bits, bias)
    return torch.ops.lass_sparse.masked_linear(x, weight, bits, bias)


# ------------------------------------------------------------------------ segmented (mixed pairs)


class _SegmentedFn(torch.autograd.Function):
    """The eager twin of the op's registered autograd."""

    @staticmethod
    def forward(ctx, x, weight, bits_bank, seg_offsets, seg_pair, bias):
        y = segmented_masked_linear_body(x, weight, bits_bank, seg_offsets, seg_pair, bias)
        schema.seg_setup(ctx, (x, weight, bits_bank, seg_offsets, seg_pair, bias), y)
        return y

    backward = staticmethod(schema.seg_backward)


# no-grad direct path: the C++ entries (they defer to the body for calls they do not take; on
# CUDA: a table not registered with remember(), or more rows than the segmented GEMV's)
SEG_NATIVE = {"cpu": native_kernel("segmented_masked_linear"),
              "cuda": native_kernel("segmented_masked_linear", "CUDA")}


def segmented_masked_linear(
    x: Tensor,
    weight: Tensor,
    bits_bank: Tensor,
    seg_offsets: Tensor,
    seg_pair: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """Mixed-pair masked linear: rows ``seg_offsets[s]:seg_offsets[s+1]`` of ``x[T, K]`` use
    mask ``bits_bank[seg_pair[s]]`` (``bits_bank: int32[P, N, ceil(K/32)]``). Returns ``[T, N]``.

    ``seg_offsets: int64[S+1]`` is non-decreasing from 0 to T (empty segments allowed);
    ``seg_pair: int64[S]`` holds pair ids in ``[0, P)`` in any order.
    """
    args = (x, weight, bits_bank, seg_offsets, seg_pair, bias)
    if forward_direct(*args):
        if needs_grad(x, weight, bias):
            return profiled("segmented_masked_linear", _SegmentedFn.apply, *args)
        return profiled("segmented_masked_linear",
                        SEG_NATIVE.get(x.device.type, segmented_masked_linear_body), *args)
    return torch.ops.lass_sparse.segmented_masked_linear(*args)


# ---------------------------------------------------------------------------- fused QKV projection


# The direct path's QKV kernel by device type: the C++ entries (CPU: the forward kernel and the
# split; CUDA: the decode GEMV or the cuBLAS route; they defer to the body for calls they do not
# take), the body elsewhere.
QKV_NATIVE = {"cpu": native_kernel("masked_qkv_proj"),
              "cuda": native_kernel("masked_qkv_proj", "CUDA")}


def _qkv_kernel(x: Tensor):
    return QKV_NATIVE.get(x.device.type, masked_qkv_proj_body)


class _MaskedQKVFn(torch.autograd.Function):
    """The eager twin of the op's registered autograd."""

    @staticmethod
    def forward(ctx, x, weight, bits, bias, num_heads):
        q, k, v = _qkv_kernel(x)(x, weight, bits, bias, num_heads)
        schema.qkv_setup(ctx, (x, weight, bits, bias, num_heads), (q, k, v))
        return q, k, v

    backward = staticmethod(schema.qkv_backward)


def _cpp_qkv_autograd(x: Tensor, weight: Tensor, bits: Tensor, bias: Tensor | None,
                      num_heads: int):
    """masked_qkv_proj with its gradient as one C++ autograd node (unforced eager, CPU or CUDA
    tensors; its forward is the public op: the C++ entry on CUDA's cuBLAS route, the Python body
    elsewhere, and its dx / dW the public ops' kernels); None when the Python node must take it.
    Errors are worded by the op's checks."""
    op = _train_op("masked_qkv_autograd")
    if (op is None or x.device.type not in ("cpu", "cuda") or x.dim() != 3 or weight.dim() != 2
            or weight.shape[0] != 3 * x.shape[2] or registry.forced_backend() is not None):
        return None
    try:
        return op(x, weight, bits, bias, num_heads)
    except (RuntimeError, ValueError, TypeError, IndexError):
        check_qkv(x, weight, bits, bias, num_heads)
        raise


def masked_qkv_proj(
    x: Tensor, weight: Tensor, bits: Tensor, bias: Tensor | None, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Masked packed in-projection: ``x[B, T, D]``, ``weight[3D, D]`` (q, k, v rows stacked, as
    ``nn.MultiheadAttention.in_proj_weight``), ``bits: int32[3D, ceil(D/32)]``. Returns q, k, v
    each ``[B, H, T, D/H]``, the layout ``scaled_dot_product_attention`` takes."""
    if forward_direct(x, weight, bits, bias):
        if needs_grad(x, weight, bias):
            out = profiled("masked_qkv_proj", _cpp_qkv_autograd, x, weight, bits, bias,
                           num_heads)
            if out is not None:
                return out
            return profiled("masked_qkv_proj", _MaskedQKVFn.apply, x, weight, bits, bias,
                            num_heads)
        return profiled("masked_qkv_proj", _qkv_kernel(x), x, weight, bits, bias, num_heads)
    return torch.ops.lass_sparse.masked_qkv_proj(x, weight, bits, bias, num_heads)


# ----------------------------------------------------------------------------------- masked AdamW

ADAMW_NATIVE = {"cpu": native_kernel("masked_adamw_"),
                "cuda": native_kernel("masked_adamw_", "CUDA")}


def masked_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    bits: Sequence[Tensor | None],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    step: int,
    maximize: bool = False,
) -> None:
    """One AdamW step, in place, over a list of params (one launch where the backend can).

    Entries whose mask bit is 1 (every entry when ``bits[i] is None``) get the AdamW update
    (decoupled weight decay, bias correction for ``step`` >= 1); entries whose bit is 0 keep
    ``p``, ``exp_avg`` and ``exp_avg_sq`` bit-for-bit. State is float32 for any param dtype.
    """
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(bits), lr, beta1,
            beta2, eps, weight_decay, step, maximize)
    # direct in plain eager under no_grad (as optimizers step); mutation under grad mode, and
    # every traced call, through the op
    if not torch.is_grad_enabled() and is_plain_eager(*args[0], *args[1], *args[2], *args[3],
                                                      *args[4]):
        dev = args[0][0].device.type if args[0] and isinstance(args[0][0], Tensor) else None
        profiled("masked_adamw_", ADAMW_NATIVE.get(dev, masked_adamw_body), *args)
        return
    torch.ops.lass_sparse.masked_adamw_(*args)


def masked_adamw_capturable_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    bits: Sequence[Tensor | None],
    *,
    state_steps: Sequence[Tensor],
    lr: Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    maximize: bool = False,
) -> None:
    """:func:`masked_adamw_` with the step counts and the learning rate as tensors on the
    params' device (``state_steps[i]``: param i's count *including* this update; ``lr``: one
    element), read by the kernels, never on the host: the step can be captured in a CUDA graph
    and replayed (as ``torch.optim.AdamW(capturable=True)``). The caller advances the steps
    (``torch._foreach_add_(state_steps, 1)``) before the call."""
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(bits),
            list(state_steps), lr, beta1, beta2, eps, weight_decay, maximize)
    if not isinstance(lr, Tensor):  # the schema would refuse it with a cast error: ours words it
        masked_adamw_capturable_body(*args)
    if not torch.is_grad_enabled() and is_plain_eager(*args[0], *args[1], *args[2], *args[3],
                                                      *args[4], *args[5], lr):
        profiled("masked_adamw_capturable_", masked_adamw_capturable_body, *args)
        return
    torch.ops.lass_sparse.masked_adamw_capturable_(*args)
