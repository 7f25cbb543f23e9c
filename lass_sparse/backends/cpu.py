"""C++ CPU backend (csrc/cpu, OpenMP): registers ``lass_sparse._C`` kernels for CPU tensors."""

from __future__ import annotations

from .. import _registry

try:
    from .. import _C  # noqa: F401  (loads the TORCH_LIBRARY ops lass_sparse_cpu::*)
except ImportError as e:
    _registry.set_status(
        "cpu", False,
        f"the C++ extension lass_sparse._C is not built ({e}); reinstall with "
        "`pip install --no-build-isolation .` (needs a C++ compiler)",
    )
else:
    _registry.set_status("cpu", True, "C++ extension lass_sparse._C (OpenMP)")
