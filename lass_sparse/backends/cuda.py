"""CUDA C++ backend (csrc/cuda) through the compiled extension ``lass_sparse._cuda``: pack /
unpack, magnitude mask, decode GEMV (M <= 16) and the multi-tensor masked AdamW.

A ``_cuda`` module that was built but does not import is reported as *broken* (tests fail on it
instead of skipping); one that was never built is just inactive, with the reason."""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .. import _registry
from ._cuda_common import GEMV_MAX_M, SUFFIX, by_dtype

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


def _register() -> None:
    _ops = torch.ops.lass_sparse_cuda

    def _reg(op, supports=None, requires="", dtypes=tuple(SUFFIX)):
        return _registry.register(op, "cuda", ("cuda",), supports=supports, requires=requires,
                                  dtypes=dtypes)

    _reg("pack_mask", dtypes=None)(lambda mask: _ops.pack_mask(mask))
    _reg("unpack_mask", dtypes=None)(lambda bits, k: _ops.unpack_mask(bits, k))

    @_reg("magnitude_mask", lambda w, *a: w.dtype in SUFFIX, f"{_FLOATS} weights")
    def magnitude_mask(weight, alpha):
        from ..reference import magnitude_threshold

        thr = magnitude_threshold(weight, alpha)
        return _ops.magnitude_pack(weight, -1.0 if thr is None else float(thr))

    @_reg("masked_linear", lambda x, *a: x.dtype in SUFFIX and x.shape[0] <= GEMV_MAX_M,
          f"at most {GEMV_MAX_M} rows (decode GEMV) of {_FLOATS}")
    def masked_linear(x, weight, bits, bias):
        return _ops.decode_gemv(x, weight, bits, bias)

    @_reg("masked_adamw_", lambda ps, *a: all(p.dtype in SUFFIX for p in ps),
          f"{_FLOATS} params")
    def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps,
                      weight_decay, step, maximize):
        for group in by_dtype(params, grads, exp_avgs, exp_avg_sqs, bits).values():
            _ops.masked_adamw_(*group, lr, beta1, beta2, eps, weight_decay, step, maximize)


if not torch.cuda.is_available():
    _registry.set_status(
        "cuda", False,
        "no CUDA GPU visible to torch (torch.cuda.is_available() is False); install a CUDA build "
        "of torch on a GPU machine",
    )
else:
    _mod, _reason, _broken = load()
    if _mod is not None:
        _register()
    _registry.set_status("cuda", _mod is not None, _reason, broken=_broken)
