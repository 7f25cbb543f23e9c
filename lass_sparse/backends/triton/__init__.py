"""Triton backend: GEMM-shaped kernels for CUDA tensors.

Registered for CUDA tensors when Triton and a GPU are present. Under ``TRITON_INTERPRET=1``
without a GPU the same kernels are registered for CPU tensors as *explicit-only* (chosen only via
``use_backend("triton")`` / ``LASS_SPARSE_BACKEND=triton``), which is how the tests run them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ...ops import registry

_interp = os.environ.get("TRITON_INTERPRET") == "1"
_OPS = ("masked_cast", "masked_linear", "masked_linear_dx", "masked_linear_dw",
        "masked_linear_dw_accumulate_", "segmented_masked_linear", "segmented_masked_linear_dx",
        "segmented_masked_linear_dw", "masked_qkv_proj")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_REQUIRES = "float32, float16 or bfloat16 tensors"


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels with these versions, or None.

    Triton <= 3.6's interpreter converts 1-element numpy arrays to Python ints with ``int(a)``,
    which numpy >= 2.4 refuses (triton-lang/triton#9171): every kernel with a dynamic ``range``
    then fails. (Compiled kernels on a GPU are unaffected.)"""
    if _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter fails with numpy {numpy_version} (numpy "
                ">= 2.4 refuses int() of 1-element arrays, triton-lang/triton#9171): install "
                "numpy<2.4 or triton>=3.7 to run the kernels on CPU")
    return None


if importlib.util.find_spec("triton") is None:  # presence only: importing triton costs ~0.2 s
    registry.set_status("triton", False, "triton is not installed; `pip install triton`")
else:
    if torch.cuda.is_available():
        devices, explicit, reason = ("cuda",), False, "Triton kernels for CUDA tensors"
        if _interp:
            reason += " (TRITON_INTERPRET=1: interpreted, not compiled)"
    elif _interp:
        devices, explicit = ("cpu",), True
        reason = ("Triton interpreter (TRITON_INTERPRET=1) on CPU tensors; explicit only: "
                  "use_backend('triton')")
    else:
        devices = None
        registry.set_status(
            "triton", False,
            "no CUDA GPU visible to torch (set TRITON_INTERPRET=1 before importing to run the "
            "kernels in Triton's CPU interpreter, for testing)",
        )
    if devices is not None and _interp:
        from importlib.metadata import PackageNotFoundError, version

        try:
            problem = interpreter_problem(version("triton"), version("numpy"))
        except PackageNotFoundError as e:
            problem = f"Triton's interpreter needs numpy ({e})"
        if problem is not None:
            devices = None
            registry.set_status("triton", False, problem)
    if devices is not None:
        from . import kernels

        # ``dtypes`` (of the first argument: x, grad_out or grad) is the only condition: no
        # ``supports`` predicate, so the registry caches the choice per (op, device, dtype)
        for op in _OPS:
            registry.register(op, "triton", devices, explicit_only=explicit, requires=_REQUIRES,
                               device_guard=True, dtypes=_FLOATS)(getattr(kernels, op))
        from . import adamw

        registry.register("masked_adamw_capturable_", "triton", devices,
                          supports=adamw.supports, explicit_only=explicit, requires=_REQUIRES,
                          device_guard=True, dtypes=_FLOATS)(adamw.masked_adamw_capturable_)
        registry.set_status("triton", True, reason)
