"""Each op's Python body: check the inputs (:mod:`.checks`), normalise them (2-D, contiguous),
and run the backend the registry (:mod:`.registry`) picks.

A body is what ``torch.ops.lass_sparse.<op>`` runs on a device without a native kernel (its
``CompositeExplicitAutograd`` kernel, :mod:`.schema`), what a native kernel defers to through
``<op>.registry`` (a forced backend, inputs it refuses; csrc/common/entry.h), and what the eager
direct path (:mod:`.eager`) runs for devices other than CPU and CUDA. Bodies never build an
autograd graph: autograd is registered once, for all backends, in :mod:`.schema`.

Kernels registered with ``validates=True`` (the C++ entries) check every tensor themselves, so
an unforced call skips the Python checks until the kernel refuses (``registry.dispatch_checked``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference as _reference  # noqa: F401  (registers the oracle kernels)
from . import registry
from .checks import (
    check_accumulate,
    check_adamw,
    check_adamw_capturable,
    check_cast,
    check_dw,
    check_dx,
    check_hyper,
    check_linear,
    check_magnitude,
    check_pack,
    check_qkv,
    check_seg_dw,
    check_seg_dx,
    check_segmented,
    check_unpack,
)


def _dispatch(op: str, device: torch.device, *args):
    return registry.dispatch(op, device, *args)


def _is_tensors(*ts) -> bool:
    return all(isinstance(t, Tensor) for t in ts)


def _checked(op: str, device: torch.device, check, *tensors: Tensor):
    """Dispatch ``op`` on contiguous ``tensors`` with ``check`` (raising) as its input checks:
    run first unless the kernel validates (``registry.dispatch_checked``)."""
    if not _is_tensors(*tensors):
        check()
    return registry.dispatch_checked(op, device, check, *(t.contiguous() for t in tensors))


def pack_mask_body(mask: Tensor) -> Tensor:
    check_pack(mask)
    return _dispatch("pack_mask", mask.device, mask.contiguous())


def unpack_mask_body(bits: Tensor, k: int) -> Tensor:
    check_unpack(bits, k)
    return _dispatch("unpack_mask", bits.device, bits.contiguous(), k)


def magnitude_mask_body(weight: Tensor, alpha: float) -> Tensor:
    check_magnitude(weight, alpha)
    return _dispatch("magnitude_mask", weight.device, weight.contiguous(), float(alpha))


def masked_cast_body(weight: Tensor, bits: Tensor, dtype: torch.dtype) -> Tensor:
    check_cast(weight, bits, dtype)
    return _dispatch("masked_cast", weight.device, weight.contiguous(), bits.contiguous(), dtype)


def masked_linear_body(x: Tensor, weight: Tensor, bits: Tensor, bias: Tensor | None) -> Tensor:
    def check() -> None:
        check_linear("masked_linear", x, weight, bits, bias)

    if not (_is_tensors(x, weight, bits) and weight.dim() == 2 and x.dim() >= 1
            and x.shape[-1] == weight.shape[1]):
        check()  # raises: the reshape below needs these
    n, k = weight.shape
    flat = x.dim() == 2
    x2 = (x if flat else x.reshape(math.prod(x.shape[:-1]), k)).contiguous()  # K may be 0
    b = None if bias is None else bias.contiguous()
    y = registry.dispatch_checked("masked_linear", x.device, check, x2, weight.contiguous(),
                                  bits.contiguous(), b)
    # detach: a plain tensor, not a view of the 2-D result, so in-place ops on the output
    # (``F.relu(..., inplace=True)``) work under autograd as after ``F.linear``
    return y if flat else y.reshape(*x.shape[:-1], n).detach()


def masked_linear_dx_body(grad_out: Tensor, weight: Tensor, bits: Tensor) -> Tensor:
    """``dx[M, K] = grad_out[M, N] @ (W ⊙ M)``."""
    return _checked("masked_linear_dx", grad_out.device,
                    lambda: check_dx("masked_linear_dx", grad_out, weight, bits),
                    grad_out, weight, bits)


def masked_linear_dw_body(grad_out: Tensor, x: Tensor, bits: Tensor) -> Tensor:
    """``dW[N, K] = (grad_out[M, N]ᵀ @ x[M, K]) ⊙ M``; off-mask entries are exactly 0."""
    return _checked("masked_linear_dw", x.device,
                    lambda: check_dw("masked_linear_dw", grad_out, x, bits), grad_out, x, bits)


def dw_accumulate_body(grad: Tensor, grad_out: Tensor, x: Tensor, bits: Tensor) -> None:
    """``grad[N, K] += (grad_out ᵀ @ x) ⊙ M`` (grad fp32 or x's dtype), for micro-batches;
    off-mask entries of ``grad`` are left as they are."""
    check_accumulate(grad, grad_out, x, bits)
    _dispatch(
        "masked_linear_dw_accumulate_", x.device, grad, grad_out.contiguous(), x.contiguous(),
        bits.contiguous(),
    )


def segmented_masked_linear_body(
    x: Tensor, weight: Tensor, bits_bank: Tensor, seg_offsets: Tensor, seg_pair: Tensor,
    bias: Tensor | None,
) -> Tensor:
    check_segmented("segmented_masked_linear", x, weight, bits_bank, seg_offsets, seg_pair, bias)
    return _dispatch(
        "segmented_masked_linear", x.device, x.contiguous(), weight.contiguous(),
        bits_bank.contiguous(), seg_offsets.long(), seg_pair.long(),
        None if bias is None else bias.contiguous(),
    )


def segmented_masked_linear_dx_body(
    grad_out: Tensor, weight: Tensor, bits_bank: Tensor, seg_offsets: Tensor, seg_pair: Tensor
) -> Tensor:
    check_seg_dx(grad_out, weight, bits_bank, seg_offsets, seg_pair)
    return _dispatch(
        "segmented_masked_linear_dx", grad_out.device, grad_out.contiguous(), weight.contiguous(),
        bits_bank.contiguous(), seg_offsets.long(), seg_pair.long(),
    )


def segmented_masked_linear_dw_body(
    grad_out: Tensor, x: Tensor, bits_bank: Tensor, seg_offsets: Tensor, seg_pair: Tensor
) -> Tensor:
    check_seg_dw(grad_out, x, bits_bank, seg_offsets, seg_pair)
    return _dispatch(
        "segmented_masked_linear_dw", x.device, grad_out.contiguous(), x.contiguous(),
        bits_bank.contiguous(), seg_offsets.long(), seg_pair.long(),
    )


def masked_qkv_proj_body(
    x: Tensor, weight: Tensor, bits: Tensor, bias: Tensor | None, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    check_qkv(x, weight, bits, bias, num_heads)
    return _dispatch(
        "masked_qkv_proj", x.device, x.contiguous(), weight.contiguous(), bits.contiguous(),
        None if bias is None else bias.contiguous(), num_heads,
    )


def masked_adamw_body(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bits: list[Tensor | None],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    maximize: bool,
) -> None:
    def check() -> None:
        check_adamw(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps,
                    weight_decay, step, real=True)

    n = len(params)
    if not params or not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(bits) == n):
        check()  # raises on unequal lengths; an empty list is a no-op
        return
    check_hyper("masked_adamw_", lr, beta1, beta2, eps, weight_decay, step)
    if not isinstance(params[0], Tensor):
        check()
    registry.dispatch_checked(
        "masked_adamw_", params[0].device, check, list(params),
        [g.contiguous() for g in grads], list(exp_avgs), list(exp_avg_sqs),
        [None if b is None else b.contiguous() for b in bits], float(lr), float(beta1),
        float(beta2), float(eps), float(weight_decay), int(step), bool(maximize),
    )


def adamw_scalars(state_steps: list[Tensor], lr: Tensor, beta1: float, beta2: float) -> Tensor:
    """float32[T, 3] on the params' device: per param (lr, 1 - beta1**step, 1 - beta2**step),
    the bias corrections computed in float64 from the step tensors — device ops only, no sync
    (so a CUDA graph replays them with the steps' current values)."""
    steps = torch.stack([s.reshape(()) for s in state_steps]).to(torch.float64)
    lr64 = lr.reshape(()).to(device=steps.device, dtype=torch.float64).expand_as(steps)
    return torch.stack([lr64, 1.0 - torch.pow(beta1, steps), 1.0 - torch.pow(beta2, steps)],
                       1).to(torch.float32)


def masked_adamw_capturable_body(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bits: list[Tensor | None],
    state_steps: list[Tensor],
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    if not check_adamw_capturable(params, grads, exp_avgs, exp_avg_sqs, bits, state_steps, lr,
                                  beta1, beta2, eps, weight_decay, real=True):
        return
    scalars = adamw_scalars(list(state_steps), lr, beta1, beta2)
    registry.dispatch(
        "masked_adamw_capturable_", params[0].device, list(params),
        [g.contiguous() for g in grads], list(exp_avgs), list(exp_avg_sqs),
        [None if b is None else b.contiguous() for b in bits], scalars, float(beta1),
        float(beta2), float(eps), float(weight_decay), bool(maximize),
    )
