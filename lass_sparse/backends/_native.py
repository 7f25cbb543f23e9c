"""The compiled kernels as the registry's choice: ``native(module, key, op)`` calls the kernel
an extension registers for ``op`` under the public name on dispatch key ``key`` (``"CPU"``,
``"CUDA"``), below autograd, with the extension's entries in kernels-only mode: the kernel runs
(no deferral to the op's Python body, csrc/common/entry.h) and a refusal raises the kernel's own
error, which the op words (``validates``) or its checks preceded."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch


def native(module: ModuleType, key: str, op: str) -> Callable:
    handle = getattr(torch.ops.lass_sparse, op).default
    keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def run(*args):
        prev = module.kernels_only(True)
        try:
            return handle.redispatch(keys, *args)
        finally:
            module.kernels_only(prev)

    run.__name__ = run.__qualname__ = f"{key.lower()}_kernel_{op}"
    return run
