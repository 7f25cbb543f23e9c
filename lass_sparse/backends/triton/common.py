"""What the Triton kernel files share: the interpreter flag, the autotune switch, fp32 dot
precision, and the small jitted helpers (TF32 rounding, int64 row offsets, the dot at torch's
precision, the dW tile ``dyᵀ x`` over a row range)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("LASS_SPARSE_TRITON_AUTOTUNE", "1") != "0"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: ``triton.cdiv`` is a jitted function, ~1.6 µs per host call."""
    return -(-a // b)


@triton.jit
def _rna(v):
    """fp32 operands of a TF32 ``tl.dot`` rounded to nearest TF32 (10-bit mantissa, ties away),
    as cuBLAS rounds them; the tensor cores would otherwise truncate, with about twice the error
    and a bias that grows with K. 16-bit operands pass through."""
    if v.dtype == tl.float32:
        i = v.to(tl.int32, bitcast=True)
        v = ((i + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _rows(r, stride):
    """Element offsets ``r * stride`` of rows ``r``, in int64: M·K, N·K may pass 2³¹."""
    return r.to(tl.int64) * stride


def _ieee(dtype: torch.dtype) -> bool:
    """IEEE fp32 ``tl.dot`` (else TF32) — as torch's own fp32 matmul on CUDA would run."""
    if INTERPRET or dtype == torch.float64:
        return True
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(_rna(a), _rna(b), acc)


@triton.jit
def _dw_tile(dy_ptr, x_ptr, rn, rk, lo, hi, N, K, sdm, sxm, IEEE: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """fp32 ``(dyᵀ x)[rn, rk]`` over the rows ``[lo, hi)``."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        dyt = tl.load(dy_ptr + _rows(rm, sdm)[None, :] + rn[:, None],
                      mask=(rm[None, :] < hi) & (rn[:, None] < N), other=0.0)
        x = tl.load(x_ptr + _rows(rm, sxm)[:, None] + rk[None, :],
                    mask=(rm[:, None] < hi) & (rk[None, :] < K), other=0.0)
        acc = _dot(dyt, x, acc, IEEE)
    return acc
