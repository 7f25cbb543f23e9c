"""The oracle: every op in plain PyTorch (unpack, multiply, matmul). Runs on any device.

Inputs arrive already checked and normalised by :mod:`lass_sparse.ops` (2-D, contiguous);
every other backend must reproduce these results within dtype tolerance, and exactly where the
contract says so (off-mask dW is 0; off-mask optimizer state is untouched).

Non-finite values: a masked-out weight is *not used*. The mask is applied with a select
(``torch.where(M, W, 0)``), never a multiply (``W * M`` would turn a NaN/Inf stored off the mask
into NaN outputs), and the dW epilogue selects too, so off-mask dW is exactly 0 whatever ``x``
and ``grad_out`` hold (Inf/NaN included).
"""

from __future__ import annotations

import math

import torch

from .bitmask import pack_mask_reference, unpack_mask_reference
from .ops import registry as _registry

ALL = ("cpu", "cuda", "meta", "mps", "xpu")


def _select(bits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` where the mask (of ``t``'s last dim) is 1, else exactly 0 (NaN/Inf included)."""
    keep = unpack_mask_reference(bits, t.shape[-1])
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


@_registry.register("pack_mask", "reference", ALL)
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return pack_mask_reference(mask)


@_registry.register("unpack_mask", "reference", ALL)
def unpack_mask(bits: torch.Tensor, k: int) -> torch.Tensor:
    return unpack_mask_reference(bits, k)


def magnitude_threshold(weight: torch.Tensor, alpha: float) -> torch.Tensor | None:
    """``kthvalue(|w|.flatten(), int(alpha * numel))`` or None when that index is 0 (keep all)."""
    kth = int(alpha * weight.numel())
    if kth == 0:
        return None
    a = weight.detach().abs().flatten()
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()  # exact: widening keeps order and ties
    if a.is_cuda:  # CUDA kthvalue took 122 ms on 16M weights (H200); a radix sort takes ~1 ms
        return torch.sort(a).values[kth - 1]
    return a.kthvalue(kth).values


@_registry.register("magnitude_mask", "reference", ALL)
def magnitude_mask(weight: torch.Tensor, alpha: float) -> torch.Tensor:
    thr = magnitude_threshold(weight, alpha)
    if thr is None:
        keep = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    else:
        keep = weight.detach().abs().to(thr.dtype) > thr
    return pack_mask_reference(keep)


@_registry.register("masked_cast", "reference", ALL)
def masked_cast(weight: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _select(bits, weight).to(dtype)


@_registry.register("masked_linear", "reference", ALL)
def masked_linear(x, weight, bits, bias):
    return torch.nn.functional.linear(x, _select(bits, weight), bias)


@_registry.register("masked_linear_dx", "reference", ALL)
def masked_linear_dx(grad_out, weight, bits):
    return grad_out @ _select(bits, weight)


@_registry.register("masked_linear_dw", "reference", ALL)
def masked_linear_dw(grad_out, x, bits):
    return _select(bits, grad_out.t() @ x)


@_registry.register("masked_linear_dw_accumulate_", "reference", ALL)
def masked_linear_dw_accumulate_(grad, grad_out, x, bits):
    dw = grad_out.to(grad.dtype).t() @ x.to(grad.dtype)
    keep = unpack_mask_reference(bits, x.shape[1])
    grad.copy_(torch.where(keep, grad + dw, grad))  # off-mask grad untouched


def _segments(seg_offsets: torch.Tensor, seg_pair: torch.Tensor):
    offs = seg_offsets.tolist()
    return [(offs[i], offs[i + 1], p) for i, p in enumerate(seg_pair.tolist())]


@_registry.register("segmented_masked_linear", "reference", ALL)
def segmented_masked_linear(x, weight, bits_bank, seg_offsets, seg_pair, bias):
    out = x.new_zeros(x.shape[0], weight.shape[0])
    for lo, hi, p in _segments(seg_offsets, seg_pair):
        if hi > lo:
            out[lo:hi] = masked_linear(x[lo:hi], weight, bits_bank[p], bias)
    return out


@_registry.register("segmented_masked_linear_dx", "reference", ALL)
def segmented_masked_linear_dx(grad_out, weight, bits_bank, seg_offsets, seg_pair):
    dx = grad_out.new_zeros(grad_out.shape[0], weight.shape[1])
    for lo, hi, p in _segments(seg_offsets, seg_pair):
        if hi > lo:
            dx[lo:hi] = masked_linear_dx(grad_out[lo:hi], weight, bits_bank[p])
    return dx


@_registry.register("segmented_masked_linear_dw", "reference", ALL)
def segmented_masked_linear_dw(grad_out, x, bits_bank, seg_offsets, seg_pair):
    dw = torch.zeros(bits_bank.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for lo, hi, p in _segments(seg_offsets, seg_pair):
        if hi > lo:
            masked_linear_dw_accumulate_(dw, grad_out[lo:hi], x[lo:hi], bits_bank[p])
    return dw.to(x.dtype)


@_registry.register("masked_qkv_proj", "reference", ALL)
def masked_qkv_proj(x, weight, bits, bias, num_heads):
    b, t, d = x.shape
    return split_qkv(masked_linear(x.reshape(b * t, d), weight, bits, bias), b, t, num_heads)


def split_qkv(y: torch.Tensor, b: int, t: int, num_heads: int):
    """``y[B*T, 3D]`` -> three separate ``[B, H, T, D/H]`` tensors (fresh memory each, zero-size
    ones included: a custom op's outputs may not alias each other)."""
    d = y.shape[1] // 3
    y = y.reshape(b, t, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
    return tuple(y[i].clone(memory_format=torch.contiguous_format) for i in range(3))


def _write_on_mask(p, m, v, p_new, m_new, v_new, b) -> None:
    """The AdamW results into ``p``, ``m``, ``v`` where the mask ``b`` is 1 (everywhere when
    None); mask-0 entries keep their bits."""
    if b is None:
        p.copy_(p_new.to(p.dtype))
        m.copy_(m_new)
        v.copy_(v_new)
        return
    keep = unpack_mask_reference(b, p.shape[-1]).reshape(p.shape)
    p.copy_(torch.where(keep, p_new.to(p.dtype), p))
    m.copy_(torch.where(keep, m_new, m))
    v.copy_(torch.where(keep, v_new, v))


@_registry.register("masked_adamw_", "reference", ALL)
def masked_adamw_(
    params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps, weight_decay, step,
    maximize,
):
    """AdamW (decoupled decay, bias correction) on mask-1 entries; mask-0 entries untouched.

    ``bits[i] is None`` means parameter ``i`` is unmasked (plain AdamW). State is fp32; the
    update is computed in fp32 and rounded to the parameter's dtype.
    """
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    step_size = lr / bc1
    bc2_sqrt = math.sqrt(bc2)
    for p, g, m, v, b in zip(params, grads, exp_avgs, exp_avg_sqs, bits):
        g32 = g.float()
        if maximize:
            g32 = -g32
        p32 = p.float()
        p_new = p32 * (1.0 - lr * weight_decay)
        m_new = m * beta1 + g32 * (1.0 - beta1)
        v_new = v * beta2 + g32 * g32 * (1.0 - beta2)
        denom = v_new.sqrt() / bc2_sqrt + eps
        p_new = p_new - step_size * m_new / denom
        _write_on_mask(p, m, v, p_new, m_new, v_new, b)


@_registry.register("masked_adamw_capturable_", "reference", ALL)
def masked_adamw_capturable_(
    params, grads, exp_avgs, exp_avg_sqs, bits, scalars, beta1, beta2, eps, weight_decay,
    maximize,
):
    """``masked_adamw_`` with the learning rate and bias corrections read from the device:
    ``scalars[i] = (lr, 1 - beta1**step_i, 1 - beta2**step_i)`` (float32, from the op's body).
    The fused kernels' float32 formula, as tensor ops (no value is read on the host)."""
    for i, (p, g, m, v, b) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, bits)):
        lr, bc1, bc2 = scalars[i, 0], scalars[i, 1], scalars[i, 2]
        g32 = g.float()
        if maximize:
            g32 = -g32
        p32 = p.float()
        p_new = p32 - lr * weight_decay * p32
        m_new = beta1 * m + (1.0 - beta1) * g32
        v_new = beta2 * v + (1.0 - beta2) * g32 * g32
        p_new = p_new - lr * (m_new / bc1) / (torch.sqrt(v_new / bc2) + eps)
        _write_on_mask(p, m, v, p_new, m_new, v_new, b)
