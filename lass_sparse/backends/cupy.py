"""cupy backend: compiles the torch-free ``csrc/cuda/lass_kernels.cuh`` at run time with NVRTC
(``cupy.RawModule``) and launches it on torch's current stream — for wheels without a CUDA build.
Serves pack/unpack, the magnitude mask, the decode GEMV (M <= 16) and the fused masked AdamW.

Tensors go to the kernels as raw device pointers (``numpy.uint64(t.data_ptr())``), never as cupy
arrays: torch exports bfloat16 to cupy as an opaque ``<V2`` type and cupy has no bfloat16 dtype.
Launches run under ``torch.cuda.device(tensor's device)`` (the registry's device guard) on that
device's current torch stream. NVRTC gets the CUDA include folder (``cuda_bf16.h``) found by
:func:`~lass_sparse.backends._cuda_common.cuda_include_dirs`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ops import registry
from ._cuda_common import (
    ADAMW_BLOCK,
    ADAMW_CHUNK,
    GEMV_MAX_M,
    MISSING_HEADERS,
    SUFFIX,
    abi,
    adamw_tables,
    bias_corrections,
    by_dtype,
    check_adamw_args,
    check_gemv_args,
    check_magnitude_args,
    check_pack_args,
    check_unpack_args,
    cuda_include_dirs,
    gemv2_plan,
    kernel_source,
    nvrtc_options,
)

_FLOATS = "float32, float16 or bfloat16"


def ptr(t: torch.Tensor | None) -> np.uint64:
    """A kernel pointer argument: the tensor's device address (0 for None)."""
    return np.uint64(0 if t is None else t.data_ptr())


def grid_for(n_threads: int, block: int) -> tuple[int]:
    return ((n_threads + block - 1) // block,)


def _setup() -> None:
    if not torch.cuda.is_available():
        registry.set_status(
            "cupy", False,
            "no CUDA GPU visible to torch; cupy runs the CUDA kernels only on a GPU",
        )
        return
    try:
        import cupy
    except ImportError:
        registry.set_status(
            "cupy", False, "cupy is not installed; `pip install lass_sparse[cupy]` (cupy-cuda13x)"
        )
        return
    include = cuda_include_dirs()
    if not include:
        registry.set_status("cupy", False, MISSING_HEADERS, broken=True)
        return
    modules: dict[int, object] = {}

    def _fn(name: str):
        dev = torch.cuda.current_device()
        if dev not in modules:  # a RawModule is loaded on the device current at first use
            with cupy.cuda.Device(dev):
                modules[dev] = cupy.RawModule(code=kernel_source(), options=nvrtc_options(include))
        return modules[dev].get_function(name)

    def _launch(name, grid, block, *args, shared_mem=0):
        if grid[0] == 0:
            return
        dev = torch.cuda.current_device()
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream, dev)
        with cupy.cuda.Device(dev), stream:
            _fn(name)(grid, (block,), args, shared_mem=shared_mem)

    def _reg(op, supports=None, requires="", dtypes=tuple(SUFFIX)):
        return registry.register(op, "cupy", ("cuda",), supports=supports, requires=requires,
                                  device_guard=True, dtypes=dtypes)

    @_reg("pack_mask", dtypes=None)
    def pack_mask(mask):
        check_pack_args(mask)
        m = mask.reshape(-1, mask.shape[-1]).contiguous()
        rows, k = m.shape
        nw = (k + 31) // 32
        bits = torch.empty(rows, nw, dtype=torch.int32, device=mask.device)
        _launch("lass_pack_mask", grid_for(rows * nw, 256), 256, ptr(m), ptr(bits),
                np.int64(rows), np.int64(k), np.int64(nw))
        return bits.reshape(*mask.shape[:-1], nw)

    @_reg("unpack_mask", dtypes=None)
    def unpack_mask(bits, k):
        check_unpack_args(bits, k)
        b = bits.reshape(-1, bits.shape[-1]).contiguous()
        rows = b.shape[0]
        out = torch.empty(rows, k, dtype=torch.bool, device=bits.device)
        _launch("lass_unpack_mask", grid_for(rows * k, 256), 256, ptr(b), ptr(out),
                np.int64(rows), np.int64(k), np.int64(b.shape[1]))
        return out.reshape(*bits.shape[:-1], k)

    def _float_ok(t, *_a):
        return t.dtype in SUFFIX

    @_reg("magnitude_mask", _float_ok, f"{_FLOATS} weights")
    def magnitude_mask(weight, alpha):
        from ..reference import magnitude_threshold

        check_magnitude_args(weight)
        w = weight.reshape(-1, weight.shape[-1]).contiguous()
        rows, k = w.shape
        nw = (k + 31) // 32
        thr = magnitude_threshold(weight, alpha)
        bits = torch.empty(rows, nw, dtype=torch.int32, device=weight.device)
        t = np.float32(-1.0 if thr is None else float(thr))  # -1: keep everything
        _launch(f"lass_magnitude_pack_{SUFFIX[w.dtype]}", grid_for(rows * nw, 256), 256, ptr(w),
                t, ptr(bits), np.int64(rows), np.int64(k), np.int64(nw))
        return bits.reshape(*weight.shape[:-1], nw)

    def _gemv_ok(x, *_a):
        return x.dtype in SUFFIX and x.shape[0] <= GEMV_MAX_M

    @_reg("masked_linear", _gemv_ok, f"at most {GEMV_MAX_M} rows (decode GEMV) of {_FLOATS}")
    def masked_linear(x, weight, bits, bias):
        check_gemv_args(x, weight, bits, bias)
        m, k = x.shape
        n = weight.shape[0]
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        if m == 0:
            return y
        plan = gemv2_plan(x, weight)  # $LASS_SPARSE_CUDA_GEMV=v2: issue 29's decode kernel
        if plan is not None:
            name, blocks, kc, smem = plan
            _launch(f"lass_decode_gemv2_{SUFFIX[x.dtype]}_{name}", (blocks,),
                    abi()["kGemv2Threads"], ptr(x), ptr(weight), ptr(bits), ptr(bias), ptr(y),
                    np.int32(m), np.int64(n), np.int64(k), np.int64((k + 31) // 32),
                    np.int32(kc), shared_mem=smem)
            return y
        warps = 8
        _launch(f"lass_decode_gemv_{SUFFIX[x.dtype]}", grid_for(n, warps), 32 * warps, ptr(x),
                ptr(weight), ptr(bits), ptr(bias), ptr(y), np.int32(m), np.int64(n),
                np.int64(k), np.int64((k + 31) // 32))
        return y

    def _adamw_ok(params, *_a):
        return all(p.dtype in SUFFIX for p in params)

    @_reg("masked_adamw_", _adamw_ok, f"{_FLOATS} params")
    def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps,
                      weight_decay, step, maximize):
        check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, bits)
        if step < 1:
            raise ValueError(f"masked_adamw_: step must be >= 1, got {step}")
        bc1, bc2 = bias_corrections(beta1, beta2, step)
        for dtype, group in by_dtype(params, grads, exp_avgs, exp_avg_sqs, bits).items():
            table, ct, cs = adamw_tables(*group)
            _launch(f"lass_masked_adamw_{SUFFIX[dtype]}", (ct.numel(),), ADAMW_BLOCK, ptr(table),
                    ptr(ct), ptr(cs), np.int64(ADAMW_CHUNK), np.float32(lr), np.float32(beta1),
                    np.float32(beta2), np.float32(eps), np.float32(weight_decay),
                    np.float32(bc1), np.float32(bc2), np.int32(bool(maximize)))

    registry.set_status("cupy", True, f"cupy (NVRTC) kernels from csrc/cuda/lass_kernels.cuh "
                                       f"(CUDA headers: {include[0]})")


_setup()
