"""Backends load softly: a missing native library or package marks the backend inactive with a
reason (see :func:`lass_sparse.backends`) and the ops fall back to the next backend."""

from __future__ import annotations

import importlib

from ..ops import registry

_MODULES = {"cpu": ".cpu", "triton": ".triton", "cuda": ".cuda", "cupy": ".cupy"}


def load_all() -> None:
    """Import every backend module; each registers its kernels and calls ``set_status``."""
    for name, mod in _MODULES.items():
        try:
            importlib.import_module(mod, __name__)
        except Exception as e:  # noqa: BLE001 - a broken backend must not break the import
            registry.set_status(name, False, f"failed to load ({type(e).__name__}: {e})")
