"""CUDA C++ backend (csrc/cuda) through the compiled extension ``lass_sparse._cuda``: pack /
unpack, magnitude mask, decode GEMV (M <= 16) and the multi-tensor masked AdamW. Its kernels
register under the public op names (``TORCH_LIBRARY_IMPL(lass_sparse, CUDA)``): a CUDA call
through ``torch.ops`` reaches them in one dispatcher trip, and they defer to the op's Python body
(Triton, cupy, the reference) when another backend is forced or a call is not theirs
(csrc/common/entry.h). Here they are also registered with the backend registry, for forced
``cuda``, the eager calls and ``backends()``.

A ``_cuda`` module that was built but does not import is reported as *broken* (tests fail on it
instead of skipping); one that was never built is just inactive, with the reason."""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from ..ops import registry
from . import _native
from ._cuda_common import GEMV_MAX_M, SUFFIX

MODULE = "lass_sparse._cuda"
_FLOATS = "float32, float16 or bfloat16"


def load(import_module=importlib.import_module, find_spec=importlib.util.find_spec):
    """Import the extension: ``(module or None, reason, broken)``."""
    try:
        spec = find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    try:
        return import_module(MODULE), "CUDA extension lass_sparse._cuda", False
    except ImportError as e:
        if spec is not None:
            where = getattr(spec, "origin", None) or MODULE
            return None, (f"the CUDA extension was built ({where}) but fails to import "
                          f"({type(e).__name__}: {e}); rebuild it against this torch"), True
        return None, (
            f"the CUDA extension lass_sparse._cuda is not built ({e}); reinstall with nvcc on "
            "PATH and a CUDA torch (LASS_SPARSE_FORCE_CUDA_BUILD=1), or install cupy for the "
            "runtime-compiled path"), False


native = None  # native(op): the op's CUDA kernel, where the extension loads


def _register(mod) -> None:
    global native
    native = functools.partial(_native.native, mod, "CUDA")
    # the kernels read the forced backend of their thread from here (they cannot see contextvars)
    registry.on_force(lambda name: mod.set_forced(name or ""))

    def _reg(op, supports=None, requires="", dtypes=tuple(SUFFIX)):
        return registry.register(op, "cuda", ("cuda",), supports=supports, requires=requires,
                                  dtypes=dtypes)(native(op))

    _reg("pack_mask", dtypes=None)
    _reg("unpack_mask", dtypes=None)
    _reg("magnitude_mask", lambda w, *a: w.dtype in SUFFIX, f"{_FLOATS} weights")
    _reg("masked_linear", lambda x, *a: x.dtype in SUFFIX and x.shape[0] <= GEMV_MAX_M,
         f"at most {GEMV_MAX_M} rows (decode GEMV) of {_FLOATS}")
    # one launch per param dtype (the kernel groups a mixed list)
    _reg("masked_adamw_", lambda ps, *a: all(p.dtype in SUFFIX for p in ps), f"{_FLOATS} params")


if not torch.cuda.is_available():
    registry.set_status(
        "cuda", False,
        "no CUDA GPU visible to torch (torch.cuda.is_available() is False); install a CUDA build "
        "of torch on a GPU machine",
    )
else:
    _mod, _reason, _broken = load()
    if _mod is not None:
        _register(_mod)
    registry.set_status("cuda", _mod is not None, _reason, broken=_broken)
