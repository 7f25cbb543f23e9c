"""CUDA C++ backend (csrc/cuda) through the compiled extension ``lass_sparse._cuda``: pack /
unpack, magnitude mask, decode GEMV (M <= 16), the small-M dx / dW kernels (M <= 16, up to 64
on request: one pass over W or dW per 16 rows, the mask applied as dW is written, a float32
grad accumulated from 16-bit inputs), the "mask, then cuBLAS" route of masked_linear, its dx,
dW and dW accumulation and the fused QKV projection (M >= ``cublas_min_m()``: one mask pass
into a W-sized transient, then cuBLAS; dW masked in place), the segmented decode GEMV
(mixed-pair rows, T <= 64: W streamed once per 16 rows, the table read on the device) and the
multi-tensor masked AdamW. Its kernels register under the public op names
(``TORCH_LIBRARY_IMPL(lass_sparse, CUDA)``): a CUDA call through ``torch.ops`` reaches them in
one dispatcher trip, and they defer to the op's Python body (Triton, cupy, the reference) when
another backend is forced or a call is not theirs (csrc/common/entry.h). Here they are also
registered with the backend registry, for forced ``cuda``, the eager calls and ``backends()``.

A ``_cuda`` module that was built but does not import is reported as *broken* (tests fail on it
instead of skipping); one that was never built is just inactive, with the reason."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os

import torch

from ..ops import registry
from . import _native
from ._cuda_common import (
    GEMV_MAX_M,
    SEG_GEMV_MAX_T,
    SUFFIX,
    cublas_min_m,
    gemv_max_rows,
    small_bwd_max_m,
)

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


# The ops of the cuBLAS route and the rows from which the entries take them (-1: off); set by
# :func:`set_cublas_routes`.
CUBLAS_OPS = ("masked_linear", "masked_linear_dx", "masked_linear_dw", "masked_qkv_proj")
cublas_rows: dict[str, int] = dict.fromkeys(CUBLAS_OPS, -1)


def _routed_elsewhere(op: str) -> bool:
    """A measured Triton route (backends/triton/routes.json) names ``op``'s kernel for some GPU
    model: the op body must choose, so the entries leave the op's calls to it (any model's
    entry counts: naming this GPU would initialise CUDA at import)."""
    try:
        from .triton import routes

        table = routes.table() if os.environ.get(routes.ENV) != "0" else {}
    except (ImportError, OSError, ValueError):  # a bad table is the Triton kernels' error
        return False
    return any(op in entry["routes"] for entry in table.values())


def set_cublas_routes(mod, min_m: int | None = None, routed=_routed_elsewhere) -> dict[str, int]:
    """Tell the extension's entries from which rows they take each op's cuBLAS route
    (``min_m``, default :func:`cublas_min_m`; off for ops a measured route sends elsewhere)."""
    min_m = cublas_min_m() if min_m is None else min_m
    for op in CUBLAS_OPS:
        cublas_rows[op] = -1 if min_m < 0 or routed(op) else min_m
        mod.set_option(f"cublas_min_m.{op}", cublas_rows[op])
    return dict(cublas_rows)


# Rows up to which dx / dW take the small-M kernels (-1: off); set by :func:`set_small_bwd`.
small_rows = -1


def set_small_bwd(mod, max_m: int | None = None) -> int:
    """Tell the extension up to which rows dx / dW take the small-M kernels (``max_m``, default
    :func:`small_bwd_max_m`; <= 0: off)."""
    global small_rows
    small_rows = small_bwd_max_m() if max_m is None else (max_m if max_m > 0 else -1)
    mod.set_option("small_bwd_max_m", small_rows)
    return small_rows


def _triton_variant_set() -> bool:
    """A Triton variant is being timed or tested: the op body runs it (as the entries)."""
    return bool(os.environ.get("LASS_SPARSE_TRITON_VARIANT"))


def _small_serves(rows: int) -> bool:
    """As the entries' ``small_takes``."""
    return rows <= small_rows and not _triton_variant_set()


def _cublas_serves(op: str, rows: int) -> bool:
    """As the entries' ``cublas_takes``: from the op's rows, unless a Triton variant is set."""
    return 0 <= cublas_rows[op] <= rows and not _triton_variant_set()


def _takes_linear(x, w, bits, bias=None) -> bool:
    rows = math.prod(x.shape[:-1])
    return x.dtype in SUFFIX and (rows <= gemv_max_rows() or (
        _cublas_serves("masked_linear", rows) and w.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)))


def _takes_grad(op: str):
    def takes(dy, other, *_a) -> bool:
        return (dy.dim() == 2 and dy.dtype in SUFFIX and other.dtype == dy.dtype
                and (_small_serves(dy.shape[0]) or _cublas_serves(op, dy.shape[0])))
    return takes


def _takes_qkv(x, w, bits, bias, num_heads) -> bool:
    rows = x.shape[0] * x.shape[1] if x.dim() == 3 else 0
    return (x.dim() == 3 and x.dtype in SUFFIX and w.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype)
            and (rows <= gemv_max_rows() or _cublas_serves("masked_qkv_proj", rows)))


_takes_dw = _takes_grad("masked_linear_dw")


def _takes_accumulate(grad, dy, x, bits) -> bool:
    small = dy.dim() == 2 and _small_serves(dy.shape[0])
    return (grad.dtype == dy.dtype or (small and grad.dtype == torch.float32)) and _takes_dw(dy, x)


def _takes_segmented(x, w, bank, offs, pairs, bias=None) -> bool:
    """The segmented decode GEMV: at most SEG_GEMV_MAX_T rows, one dtype."""
    return (x.dim() == 2 and x.shape[0] <= SEG_GEMV_MAX_T and x.dtype in SUFFIX
            and w.dtype == x.dtype and (bias is None or bias.dtype == x.dtype))


def _takes_cast(w, bits, dtype) -> bool:
    """As the entry's ``cast_pair``: one kernel dtype, or fp32 <-> bf16 / fp16."""
    return (w.dtype in SUFFIX and dtype in SUFFIX
            and (w.dtype == dtype or torch.float32 in (w.dtype, dtype)))


def _register(mod) -> None:
    global native
    native = functools.partial(_native.native, mod, "CUDA")
    set_cublas_routes(mod)
    set_small_bwd(mod)
    # the kernels read the forced backend of their thread from here (they cannot see contextvars)
    registry.on_force(lambda name: mod.set_forced(name or ""))

    def _reg(op, supports=None, requires="", dtypes=tuple(SUFFIX)):
        return registry.register(op, "cuda", ("cuda",), supports=supports, requires=requires,
                                  dtypes=dtypes)(native(op))

    _reg("pack_mask", dtypes=None)
    _reg("unpack_mask", dtypes=None)
    _reg("magnitude_mask", lambda w, *a: w.dtype in SUFFIX, f"{_FLOATS} weights")
    _reg("masked_cast", _takes_cast,
         "float32 -> float32, bfloat16 or float16, or bfloat16 / float16 -> itself or float32")
    _reg("masked_linear", _takes_linear,
         f"at most {GEMV_MAX_M} rows (decode GEMV; {SEG_GEMV_MAX_T} with "
         f"LASS_SPARSE_CUDA_GEMV=v3) or, with weight and bias of x's dtype, at "
         f"least {cublas_rows['masked_linear']} (cuBLAS route; -1 or $LASS_SPARSE_TRITON_VARIANT "
         f"set: off) of {_FLOATS}")
    for op, takes in (("masked_linear_dx", _takes_grad("masked_linear_dx")),
                      ("masked_linear_dw", _takes_dw)):
        _reg(op, takes, f"at most {small_rows} rows (small-M kernels) or at least "
                        f"{cublas_rows[op]} (cuBLAS route; -1: off) of one dtype of {_FLOATS}")
    _reg("masked_qkv_proj", _takes_qkv,
         f"B*T <= {GEMV_MAX_M} rows (decode GEMV) or >= {cublas_rows['masked_qkv_proj']} "
         f"(cuBLAS route; -1: off) of one dtype of {_FLOATS}")
    _reg("masked_linear_dw_accumulate_", _takes_accumulate,
         f"at most {small_rows} rows (small-M kernel; grad of x's dtype or float32) or at least "
         f"{cublas_rows['masked_linear_dw']} (cuBLAS route; -1: off; grad of x's dtype) of one "
         f"dtype of {_FLOATS}")
    _reg("segmented_masked_linear", _takes_segmented,
         f"at most {SEG_GEMV_MAX_T} rows (segmented decode GEMV) of one dtype of {_FLOATS}")
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
