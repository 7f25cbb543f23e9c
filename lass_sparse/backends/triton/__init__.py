"""Triton backend: GEMM-shaped kernels for CUDA tensors (CPU tensors under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import torch

from ... import _registry

_interp = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401
except ImportError:
    _registry.set_status("triton", False, "triton is not installed; `pip install triton`")
else:
    if not (torch.cuda.is_available() or _interp):
        _registry.set_status(
            "triton", False,
            "no CUDA GPU visible to torch (set TRITON_INTERPRET=1 before importing to run the "
            "kernels in Triton's CPU interpreter, for testing)",
        )
    else:
        _registry.set_status("triton", False, "Triton kernels are not wired up in this version")
