"""Host-side helpers shared by the CUDA-extension and cupy backends (no GPU needed to import)."""

from __future__ import annotations

import functools
import glob
import os
import re
import sys
from importlib import resources

import torch

ABI_HEADER = "lass_abi.h"
_ABI_INCLUDE = f'#include "{ABI_HEADER}"'


def _source(name: str) -> str:
    """Text of csrc/cuda/NAME (in-tree, or the build-time copy in lass_sparse/_cuda_src)."""
    here = os.path.dirname(os.path.abspath(__file__))
    tree = os.path.join(here, "..", "..", "csrc", "cuda", name)
    if os.path.exists(tree):
        with open(tree) as f:
            return f.read()
    return (resources.files("lass_sparse") / "_cuda_src" / name).read_text()


@functools.cache
def abi() -> dict:
    """The constants of csrc/cuda/lass_abi.h (the one ABI of kernels, binding and this loader):
    ``{"kGemvMaxM": 16, "kAdamWChunk": 65536, ..., "dtype_codes": {"kFloat32": 0, ...},
    "adamw_fields": ["p", "g", ..., "nw"]}``."""
    text = _source(ABI_HEADER)
    out: dict = {n: int(v) for n, v in re.findall(r"constexpr\s+\w+\s+(k\w+)\s*=\s*(\d+);", text)}
    enum = re.search(r"enum DTypeCode[^{]*\{([^}]*)\}", text)
    out["dtype_codes"] = {n: int(v) for n, v in re.findall(r"(k\w+)\s*=\s*(\d+)", enum.group(1))}
    body = re.search(r"struct AdamWTensor\s*\{(.*?)\};", text, re.S).group(1)
    out["adamw_fields"] = re.findall(r"(\w+);", re.sub(r"//[^\n]*", "", body))
    return out


def kernel_source() -> str:
    """lass_kernels.cuh with lass_abi.h inlined: one self-contained text for NVRTC (cupy)."""
    src = _source("lass_kernels.cuh")
    if _ABI_INCLUDE not in src:
        raise RuntimeError(f"lass_kernels.cuh does not include {ABI_HEADER}")
    return src.replace(_ABI_INCLUDE, _source(ABI_HEADER).replace("#pragma once", ""), 1)


_CODES = abi()["dtype_codes"]
DTYPE_CODE = {torch.float32: _CODES["kFloat32"], torch.float16: _CODES["kFloat16"],
              torch.bfloat16: _CODES["kBFloat16"]}
SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
GEMV_MAX_M = abi()["kGemvMaxM"]
SMALL_BWD_MAX_M = abi()["kSmallBwdMaxM"]
SEG_GEMV_MAX_T = abi()["kSegGemvMaxT"]
ADAMW_CHUNK = abi()["kAdamWChunk"]
ADAMW_BLOCK = abi()["kAdamWBlock"]
ADAMW_FIELDS = ("p", "g", "m", "v", "bits", "numel", "k", "nw")  # adamw_tables' column order
if tuple(abi()["adamw_fields"]) != ADAMW_FIELDS:
    raise ImportError(f"lass_abi.h AdamWTensor fields {abi()['adamw_fields']} differ from the "
                      f"loader's table columns {ADAMW_FIELDS}")


GEMV2_ENV = "LASS_SPARSE_CUDA_GEMV"  # "v2" / "v3": issue 29's decode kernels (default v1)


def gemv_max_rows() -> int:
    """The most rows the CUDA extension's decode GEMV takes (as ``lass_decode_gemv_max_rows``):
    SEG_GEMV_MAX_T under ``LASS_SPARSE_CUDA_GEMV=v3`` (the segmented GEMV's kernel with one
    pair), else GEMV_MAX_M."""
    return SEG_GEMV_MAX_T if os.environ.get(GEMV2_ENV) == "v3" else GEMV_MAX_M


def gemv2_plan(x, weight) -> tuple[str, int, int, int] | None:
    """How lass_launch_decode_gemv_v2 (csrc/cuda/lass_kernels.cu) launches for x [M, K] and
    weight [N, K] — ``(kernel suffix "m<MT>_r<R>", grid blocks, kc, shared bytes)`` — or None
    when v2 is not requested (``$LASS_SPARSE_CUDA_GEMV``) or does not apply (K % 8, 16-byte
    alignment): the cupy loader then runs v1, as the compiled launcher does."""
    import os

    if os.environ.get(GEMV2_ENV) != "v2":
        return None
    m, k = x.shape
    n = weight.shape[0]
    if k == 0 or k % 8 or x.data_ptr() % 16 or weight.data_ptr() % 16:
        return None
    a = abi()
    mt = next(v for v in (1, 2, 4, 8, 16) if m <= v)
    rows = 4 if n >= a["kGemv2Rows4MinN"] else 2
    step, size = a["kGemv2Step"], x.element_size()
    kc = min(a["kGemv2SmemBytes"] // (mt * size) // step * step, -(-k // step) * step)
    per_block = a["kGemv2Threads"] // 32 * rows
    return f"m{mt}_r{rows}", -(-n // per_block), kc, m * kc * size


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
    """The AdamWTensor table (int64[T, 8], columns ``ADAMW_FIELDS``: the struct of lass_abi.h)
    and the chunk table (tensor index, start) for one multi-tensor launch; on the params'
    device."""
    rows, ct, cs = [], [], []
    for i, (p, g, m, v, b) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, bits)):
        k = p.shape[-1] if p.dim() else 1
        row = {"p": p.data_ptr(), "g": g.data_ptr(), "m": m.data_ptr(), "v": v.data_ptr(),
               "bits": 0 if b is None else b.data_ptr(), "numel": p.numel(), "k": max(k, 1),
               "nw": (k + 31) // 32}
        rows.append([row[f] for f in ADAMW_FIELDS])
        for s in range(0, p.numel(), chunk):
            ct.append(i)
            cs.append(s)
    dev = params[0].device
    return (torch.tensor(rows, dtype=torch.int64, device=dev),
            torch.tensor(ct, dtype=torch.int32, device=dev),
            torch.tensor(cs, dtype=torch.int64, device=dev))


def bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    return 1.0 - beta1**step, 1.0 - beta2**step


# ------------------------------------------------------------------------- argument checks
# The cupy loader hands raw pointers to kernels that trust every size: it checks each tensor it
# touches first (dtype, device, shape, numel, contiguity), as the compiled binding does in C++.


def _d(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)} on {t.device}"


def check_tensor(op: str, name: str, t, device: torch.device, dtype=None, shape=None) -> None:
    """``t`` is a contiguous tensor on ``device`` (of ``dtype`` / ``shape`` when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} with the other tensors, got {_d(t)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {str(dtype).replace('torch.', '')}, got {_d(t)}")
    if shape is not None and list(t.shape) != list(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {_d(t)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got {_d(t)}")


def check_float_kernel(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in SUFFIX:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {_d(t)}")


def check_pack_args(mask) -> None:
    check_tensor("pack_mask", "mask", mask, getattr(mask, "device", None), torch.bool)
    if mask.dim() < 1:
        raise ValueError(f"pack_mask: mask must be bool[..., K], got {_d(mask)}")


def check_unpack_args(bits, k: int) -> None:
    check_tensor("unpack_mask", "bits", bits, getattr(bits, "device", None), torch.int32)
    if k < 0 or bits.dim() < 1 or bits.shape[-1] != (k + 31) // 32:
        raise ValueError(f"unpack_mask: bits must be int32[..., ceil(k/32)] for k={k}, "
                         f"got {_d(bits)}")


def check_magnitude_args(weight) -> None:
    check_tensor("magnitude_mask", "weight", weight, getattr(weight, "device", None))
    check_float_kernel("magnitude_mask", "weight", weight)
    if weight.dim() < 1:
        raise ValueError(f"magnitude_mask: weight must have >= 1 dim, got {_d(weight)}")


def check_gemv_args(x, weight, bits, bias) -> None:
    op = "masked_linear"
    check_tensor(op, "x", x, getattr(x, "device", None))
    check_float_kernel(op, "x", x)
    if x.dim() != 2 or x.shape[0] > GEMV_MAX_M:
        raise ValueError(f"{op}: the decode GEMV takes x [M<={GEMV_MAX_M}, K], got {_d(x)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [N, K], got {_d(weight)}")
    n, k = weight.shape[0], x.shape[1]
    check_tensor(op, "weight", weight, x.device, x.dtype, (n, k))
    check_tensor(op, "bits", bits, x.device, torch.int32, (n, (k + 31) // 32))
    if bias is not None:
        check_tensor(op, "bias", bias, x.device, x.dtype, (n,))


def check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, bits) -> None:
    op = "masked_adamw_"
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(bits) == n):
        raise ValueError(f"{op}: all lists must have one length")
    if not n:
        return
    dev = getattr(params[0], "device", None)
    for i, (p, g, m, v, b) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, bits)):
        check_tensor(op, f"params[{i}]", p, dev)
        check_float_kernel(op, f"params[{i}]", p)
        check_tensor(op, f"grads[{i}]", g, dev, p.dtype, p.shape)
        check_tensor(op, f"exp_avgs[{i}]", m, dev, torch.float32, p.shape)
        check_tensor(op, f"exp_avg_sqs[{i}]", v, dev, torch.float32, p.shape)
        if b is not None:
            if p.dim() < 1:
                raise ValueError(f"{op}: a masked param must have >= 1 dim, params[{i}] is 0-d")
            k = p.shape[-1]
            check_tensor(op, f"bits[{i}]", b, dev, torch.int32, (*p.shape[:-1], (k + 31) // 32))


CUBLAS_MIN_M_ENV = "LASS_SPARSE_CUBLAS_MIN_M"


def cublas_min_m(default: int = 64) -> int:
    """Rows from which the GEMM-shaped ops take the "W ⊙ M in one pass, then cuBLAS" route
    (``$LASS_SPARSE_CUBLAS_MIN_M``, else ``default``): the Triton backend's and the CUDA
    extension's entries (csrc/cuda/binding.cpp) use the same threshold."""
    return int(os.environ.get(CUBLAS_MIN_M_ENV, default))


SMALL_BWD_ENV = "LASS_SPARSE_CUDA_SMALL_BWD_MAX_M"


# Rows up to which dx / dW take the small-M kernels by default: the decode regime, where they
# replace the Triton kernels' host path; up to SMALL_BWD_MAX_M (64) on request, to be measured
# against the cuBLAS route from 64 rows (the sweep's ``ours_small64``).
SMALL_BWD_DEFAULT = 16


def small_bwd_max_m() -> int:
    """Rows up to which the CUDA extension's dx / dW take the small-M kernels
    (``$LASS_SPARSE_CUDA_SMALL_BWD_MAX_M``, else :data:`SMALL_BWD_DEFAULT`; 0 or -1: off; above
    the kernels' limit :data:`SMALL_BWD_MAX_M`: the limit)."""
    raw = os.environ.get(SMALL_BWD_ENV, "")
    try:
        value = int(raw) if raw.strip() else SMALL_BWD_DEFAULT
    except ValueError:
        raise ValueError(f"${SMALL_BWD_ENV} must be an integer number of rows, got {raw!r}") \
            from None
    return min(value, SMALL_BWD_MAX_M) if value > 0 else -1
