"""Host-side helpers shared by the CUDA-extension and cupy backends (no GPU needed to import)."""

from __future__ import annotations

import glob
import os
import sys
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


def cuda_include_dirs() -> list[str]:
    """Folders holding ``cuda_bf16.h`` (and the headers it includes), best first: $CUDA_HOME /
    $CUDA_PATH, the CUDA toolkit wheels (``nvidia/cu13/include``, ``nvidia/cuda_runtime/
    include``, ...), cupy's CUDA path, /usr/local/cuda*. NVRTC has no default include path."""
    cands = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH")
             if os.environ.get(v)]
    for base in dict.fromkeys(p for p in sys.path if p and os.path.isdir(p)):
        cands += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")), reverse=True)
    try:
        import cupy

        path = cupy.cuda.get_cuda_path()
        if path:
            cands.append(os.path.join(path, "include"))
    except Exception:  # noqa: BLE001 - cupy missing or without a CUDA path
        pass
    cands += ["/usr/local/cuda/include", *sorted(glob.glob("/usr/local/cuda-*/include"),
                                                 reverse=True)]
    return [d for d in dict.fromkeys(os.path.realpath(c) for c in cands)
            if os.path.exists(os.path.join(d, "cuda_bf16.h"))]


MISSING_HEADERS = (
    "cuda_bf16.h was not found (NVRTC needs the CUDA headers to compile the kernels): install "
    "the CUDA toolkit (set CUDA_HOME) or the headers wheel (`pip install "
    "nvidia-cuda-runtime` for CUDA 13 / nvidia-cuda-runtime-cu12)"
)


def nvrtc_options(include_dirs: list[str]) -> tuple[str, ...]:
    """The NVRTC options the cupy backend compiles ``lass_kernels.cuh`` with."""
    return ("--std=c++17", *(f"-I{d}" for d in include_dirs))


def by_dtype(params, grads, exp_avgs, exp_avg_sqs, bits):
    """The AdamW lists split into one group per param dtype (a kernel launch handles one)."""
    groups: dict = {}
    for item in zip(params, grads, exp_avgs, exp_avg_sqs, bits):
        groups.setdefault(item[0].dtype, []).append(item)
    return {dt: [list(col) for col in zip(*items)] for dt, items in groups.items()}


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
