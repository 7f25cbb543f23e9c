"""Triton backend: GEMM-shaped kernels for CUDA tensors.

Registered for CUDA tensors when Triton and a GPU are present. Under ``TRITON_INTERPRET=1``
without a GPU the same kernels are registered for CPU tensors as *explicit-only* (chosen only via
``use_backend("triton")`` / ``LASS_SPARSE_BACKEND=triton``), which is how the tests run them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ... import _registry

_interp = os.environ.get("TRITON_INTERPRET") == "1"
_OPS = ("masked_linear", "masked_linear_dx", "masked_linear_dw", "masked_linear_dw_accumulate_",
        "segmented_masked_linear", "segmented_masked_linear_dx", "segmented_masked_linear_dw",
        "masked_qkv_proj")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

if importlib.util.find_spec("triton") is None:  # presence only: importing triton costs ~0.2 s
    _registry.set_status("triton", False, "triton is not installed; `pip install triton`")
else:
    if torch.cuda.is_available():
        devices, explicit, reason = ("cuda",), False, "Triton kernels for CUDA tensors"
    elif _interp:
        devices, explicit = ("cpu",), True
        reason = ("Triton interpreter (TRITON_INTERPRET=1) on CPU tensors; explicit only: "
                  "use_backend('triton')")
    else:
        devices = None
        _registry.set_status(
            "triton", False,
            "no CUDA GPU visible to torch (set TRITON_INTERPRET=1 before importing to run the "
            "kernels in Triton's CPU interpreter, for testing)",
        )
    if devices is not None:
        from . import kernels

        def _supports(t: torch.Tensor, *_a) -> bool:
            return t.dtype in _FLOATS

        def _supports_grad(grad: torch.Tensor, *_a) -> bool:
            return grad.dtype in _FLOATS

        for op in _OPS:
            pred = _supports_grad if op == "masked_linear_dw_accumulate_" else _supports
            _registry.register(op, "triton", devices, supports=pred,
                               explicit_only=explicit)(getattr(kernels, op))
        _registry.set_status("triton", True, reason)
