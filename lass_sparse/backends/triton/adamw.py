"""Capturable masked AdamW (``masked_adamw_capturable_``): the learning rate and the bias
corrections are read from a device tensor by the kernel, so a CUDA graph replays the step with
the step counts' current values (``torch.optim.AdamW(capturable=True)``'s contract).

One launch per parameter (a grid over its elements): no host-built pointer table, so nothing is
copied host→device per call and every launch is capturable. The math is the CUDA multi-tensor
kernel's (csrc/cuda/lass_kernels.cuh ``adamw_element``): float32, IEEE division and square root;
entries whose mask bit is 0 are read (so the loads vectorise) but never stored
(bit-identical). PTX for sm_90 (Triton 3.6): 128-bit loads of the param, grad and state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, cdiv

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 256 if INTERPRET else 1024


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, bits_ptr, sc_ptr, numel, K, NW, beta1, beta2,
                  one_minus_beta1, one_minus_beta2, eps, weight_decay,
                  HAS_MASK: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    on = inb
    if HAS_MASK:
        r = offs // K
        c = offs % K
        word = tl.load(bits_ptr + r * NW + c // 32, mask=inb, other=0)
        on = inb & (((word >> (c % 32).to(tl.int32)) & 1) != 0)
    lr = tl.load(sc_ptr)
    bc1 = tl.load(sc_ptr + 1)
    bc2 = tl.load(sc_ptr + 2)
    # loads over every in-bounds entry (vectorised), stores only on the mask
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    p = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    m = beta1 * tl.load(m_ptr + offs, mask=inb, other=0.0) + one_minus_beta1 * g
    v = beta2 * tl.load(v_ptr + offs, mask=inb, other=0.0) + one_minus_beta2 * g * g
    p = p - lr * weight_decay * p
    denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
    p = p - tl.div_rn(lr * tl.div_rn(m, bc1), denom)
    tl.store(m_ptr + offs, m, mask=on)
    tl.store(v_ptr + offs, v, mask=on)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=on)


def supports(params, *_a) -> bool:
    return all(p.dtype in _FLOATS for p in params)


def masked_adamw_capturable_(params, grads, exp_avgs, exp_avg_sqs, bits, scalars, beta1, beta2,
                             eps, weight_decay, maximize):
    """The op's kernel (inputs checked by the op's body; ``scalars``: float32[T, 3], per param
    (lr, 1 - beta1**step, 1 - beta2**step) on the params' device)."""
    if scalars.dtype != torch.float32 or list(scalars.shape) != [len(params), 3]:
        raise ValueError(f"masked_adamw_capturable_: scalars must be float32[{len(params)}, 3], "
                         f"got {scalars.dtype}{list(scalars.shape)}")
    scalars = scalars.contiguous()
    for i, (p, g, m, v, b) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, bits)):
        n = p.numel()
        if n == 0:
            continue
        k = p.shape[-1] if p.dim() else 1
        _adamw_kernel[(cdiv(n, BLOCK),)](
            p, g, m, v, b if b is not None else m, scalars[i], n, k, (k + 31) // 32, beta1,
            beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay, HAS_MASK=b is not None,
            MAXIMIZE=maximize, BLOCK=BLOCK, num_warps=4)
