"""cupy backend: compiles the torch-free ``csrc/cuda/lass_kernels.cuh`` at run time with NVRTC
(``cupy.RawModule``) and launches it on torch's current stream — for wheels without a CUDA build.
Serves pack/unpack, the magnitude mask, the decode GEMV (M <= 16) and the fused masked AdamW."""

from __future__ import annotations

import numpy as np
import torch

from .. import _registry
from ._cuda_common import (
    ADAMW_CHUNK,
    GEMV_MAX_M,
    SUFFIX,
    adamw_tables,
    bias_corrections,
    kernel_source,
)

if not torch.cuda.is_available():
    _registry.set_status(
        "cupy", False,
        "no CUDA GPU visible to torch; cupy runs the CUDA kernels only on a GPU",
    )
else:
    try:
        import cupy
    except ImportError:
        _registry.set_status(
            "cupy", False, "cupy is not installed; `pip install lass_sparse[cupy]` (cupy-cuda13x)"
        )
    else:
        _module = None

        def _fn(name: str):
            global _module
            if _module is None:
                _module = cupy.RawModule(code=kernel_source(), options=("--std=c++17",))
            return _module.get_function(name)

        def _arr(t: torch.Tensor | None):
            return np.uint64(0) if t is None else cupy.asarray(t)

        def _launch(name, n_threads, block, *args, grid=None):
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
            g = grid or ((n_threads + block - 1) // block,)
            if g[0] == 0:
                return
            with stream:
                _fn(name)(g, (block,), args)

        def _reg(op, supports=None):
            return _registry.register(op, "cupy", ("cuda",), supports=supports)

        @_reg("pack_mask")
        def pack_mask(mask):
            m = mask.reshape(-1, mask.shape[-1]).contiguous() if mask.dim() else mask
            rows, k = m.shape
            nw = (k + 31) // 32
            bits = torch.empty(rows, nw, dtype=torch.int32, device=mask.device)
            _launch("lass_pack_mask", rows * nw, 256, _arr(m), _arr(bits), np.int64(rows),
                    np.int64(k), np.int64(nw))
            return bits.reshape(*mask.shape[:-1], nw)

        @_reg("unpack_mask")
        def unpack_mask(bits, k):
            b = bits.reshape(-1, bits.shape[-1]).contiguous()
            rows = b.shape[0]
            out = torch.empty(rows, k, dtype=torch.bool, device=bits.device)
            _launch("lass_unpack_mask", rows * k, 256, _arr(b), _arr(out), np.int64(rows),
                    np.int64(k), np.int64(b.shape[1]))
            return out.reshape(*bits.shape[:-1], k)

        def _float_ok(t, *_a):
            return t.dtype in SUFFIX

        @_reg("magnitude_mask", _float_ok)
        def magnitude_mask(weight, alpha):
            from ..reference import magnitude_threshold

            w = weight.reshape(-1, weight.shape[-1]).contiguous()
            rows, k = w.shape
            nw = (k + 31) // 32
            thr = magnitude_threshold(weight, alpha)
            bits = torch.empty(rows, nw, dtype=torch.int32, device=weight.device)
            t = np.float32(-1.0 if thr is None else float(thr))  # -1: keep everything
            _launch(f"lass_magnitude_pack_{SUFFIX[w.dtype]}", rows * nw, 256, _arr(w), t,
                    _arr(bits), np.int64(rows), np.int64(k), np.int64(nw))
            return bits.reshape(*weight.shape[:-1], nw)

        def _gemv_ok(x, *_a):
            return x.dtype in SUFFIX and x.shape[0] <= GEMV_MAX_M

        @_reg("masked_linear", _gemv_ok)
        def masked_linear(x, weight, bits, bias):
            m, k = x.shape
            n = weight.shape[0]
            y = torch.empty(m, n, dtype=x.dtype, device=x.device)
            warps = 8
            _launch(f"lass_decode_gemv_{SUFFIX[x.dtype]}", 0, 32 * warps, _arr(x),
                    _arr(weight), _arr(bits), _arr(bias), _arr(y), np.int32(m), np.int64(n),
                    np.int64(k), np.int64((k + 31) // 32), grid=((n + warps - 1) // warps,))
            return y

        def _adamw_ok(params, *_a):
            return all(p.dtype in SUFFIX for p in params) and len({p.dtype for p in params}) == 1

        @_reg("masked_adamw_", _adamw_ok)
        def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps,
                          weight_decay, step, maximize):
            table, ct, cs = adamw_tables(params, grads, exp_avgs, exp_avg_sqs, bits)
            bc1, bc2 = bias_corrections(beta1, beta2, step)
            _launch(f"lass_masked_adamw_{SUFFIX[params[0].dtype]}", 0, 512, _arr(table),
                    _arr(ct), _arr(cs), np.int64(ADAMW_CHUNK), np.float32(lr),
                    np.float32(beta1), np.float32(beta2), np.float32(eps),
                    np.float32(weight_decay), np.float32(bc1), np.float32(bc2),
                    np.int32(bool(maximize)), grid=(ct.numel(),))

        _registry.set_status("cupy", True, "cupy (NVRTC) kernels from csrc/cuda/lass_kernels.cuh")
