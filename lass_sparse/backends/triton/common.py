"""What the Triton kernel files share: the interpreter flag, the autotune switch, fp32 dot
precision, and the small jitted helpers (TF32 rounding, int64 row offsets)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("LASS_SPARSE_TRITON_AUTOTUNE", "1") != "0"


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
