"""Host-side helpers shared by the CUDA-extension and cupy backends (no GPU needed to import)."""

from __future__ import annotations

import os
from importlib import resources

import torch

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
GEMV_MAX_M = 16
ADAMW_CHUNK = 65536


def kernel_source() -> str:
    """Text of csrc/cuda/lass_kernels.cuh (in-tree, or the copy installed with the package)."""
    here = os.path.dirname(os.path.abspath(__file__))
    tree = os.path.join(here, "..", "..", "csrc", "cuda", "lass_kernels.cuh")
    if os.path.exists(tree):
        with open(tree) as f:
            return f.read()
    return (resources.files("lass_sparse") / "_cuda_src" / "lass_kernels.cuh").read_text()


def adamw_tables(params, grads, exp_avgs, exp_avg_sqs, bits, chunk: int = ADAMW_CHUNK):
    """The AdamWTensor table (int64[T, 8]: p, g, m, v, bits, numel, k, nw) and the chunk table
    (tensor index, start) for one multi-tensor launch; all on the params' device."""
    rows, ct, cs = [], [], []
    for i, (p, g, m, v, b) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, bits)):
        k = p.shape[-1] if p.dim() else 1
        rows.append([p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                     0 if b is None else b.data_ptr(), p.numel(), max(k, 1), (k + 31) // 32])
        for s in range(0, p.numel(), chunk):
            ct.append(i)
            cs.append(s)
    dev = params[0].device
    return (torch.tensor(rows, dtype=torch.int64, device=dev),
            torch.tensor(ct, dtype=torch.int32, device=dev),
            torch.tensor(cs, dtype=torch.int64, device=dev))


def bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    return 1.0 - beta1**step, 1.0 - beta2**step
