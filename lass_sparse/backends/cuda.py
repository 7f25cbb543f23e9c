"""CUDA C++ backend (csrc/cuda) through the compiled extension ``lass_sparse._cuda``."""

from __future__ import annotations

import torch

from .. import _registry

if not torch.cuda.is_available():
    _registry.set_status(
        "cuda", False,
        "no CUDA GPU visible to torch (torch.cuda.is_available() is False); install a CUDA build "
        "of torch on a GPU machine",
    )
else:
    try:
        from .. import _cuda  # noqa: F401
    except ImportError as e:
        _registry.set_status(
            "cuda", False,
            f"the CUDA extension lass_sparse._cuda is not built ({e}); reinstall with nvcc on "
            "PATH and a CUDA torch (LASS_SPARSE_FORCE_CUDA_BUILD=1), or install cupy for the "
            "runtime-compiled path",
        )
    else:
        _registry.set_status("cuda", True, "CUDA extension lass_sparse._cuda")
