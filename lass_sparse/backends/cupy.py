"""cupy backend: compiles the torch-free csrc/cuda sources at run time with NVRTC."""

from __future__ import annotations

import torch

from .. import _registry

if not torch.cuda.is_available():
    _registry.set_status(
        "cupy", False,
        "no CUDA GPU visible to torch; cupy runs the CUDA kernels only on a GPU",
    )
else:
    try:
        import cupy  # noqa: F401
    except ImportError:
        _registry.set_status(
            "cupy", False, "cupy is not installed; `pip install lass_sparse[cupy]` (cupy-cuda13x)"
        )
    else:
        _registry.set_status("cupy", False, "cupy kernels are not wired up in this version")
