"""C++ CPU backend (csrc/cpu, OpenMP). Its kernels register under the public op names
(``TORCH_LIBRARY_IMPL(lass_sparse, CPU)``), so a CPU call through ``torch.ops`` reaches them in
one dispatcher trip; they defer to the op's Python body when another backend is forced or they
refuse the inputs (csrc/common/entry.h). Here they are also registered with the backend
registry, for the eager calls, forced ``cpu`` and ``backends()``: the linear kernels take
float32, float64 and
bfloat16 (fp32 accumulation), AdamW float32 and bfloat16 params, the magnitude mask float16 too;
other calls are declined (``dtypes=``) and fall through to the reference, or raise naming the
dtype when the backend is forced."""

from __future__ import annotations

import functools

import torch

from ..ops import registry
from ..reference import split_qkv
from . import _native

try:
    from .. import _C  # loads the kernels (TORCH_LIBRARY_IMPL(lass_sparse, CPU))
except ImportError as e:
    registry.set_status(
        "cpu", False,
        f"the C++ extension lass_sparse._C is not built ({e}); reinstall with "
        "`pip install --no-build-isolation .` (needs a C++ compiler)",
    )
else:
    try:  # bf16 GEMMs on AMX tiles (csrc/cpu/amx_bf16.cpp)
        _amx = bool(torch.ops.lass_sparse_cpu.amx_bf16())
    except (AttributeError, RuntimeError):  # an extension built before it existed
        _amx = False
    registry.set_status("cpu", True, "C++ extension lass_sparse._C (OpenMP"
                        + ("; bf16 on AMX tiles)" if _amx else ")"))
    # the kernels read the forced backend of their thread from here (they cannot see contextvars)
    registry.on_force(lambda name: _C.set_forced(name or ""))
    _DTYPES = (torch.float32, torch.float64, torch.bfloat16)
    native = functools.partial(_native.native, _C, "CPU")  # native(op): the op's C++ kernel

    def _reg(op: str, dtypes=_DTYPES, validates: bool = False, fn=None):
        return registry.register(op, "cpu", ("cpu",), dtypes=dtypes, validates=validates)(
            fn or native(op))

    _reg("pack_mask", None)
    _reg("unpack_mask", None)
    _reg("magnitude_mask", (*_DTYPES, torch.float16))  # compares in fp32 for half types
    _reg("masked_cast", (*_DTYPES, torch.float16), validates=True)  # any float -> any float
    # validates: these entry points check every tensor before touching memory (common.h)
    _reg("masked_linear", validates=True)
    _reg("masked_linear_dx", validates=True)
    _reg("masked_linear_dw", validates=True)
    _reg("masked_adamw_", (torch.float32, torch.bfloat16), validates=True)
    _reg("masked_linear_dw_accumulate_")  # dtypes of grad; x and grad_out are cast to it
    _reg("segmented_masked_linear")  # one pass over W's row tiles, every segment per tile
    # C++ entries: dx per segment; dW on AMX (bf16) in one pass over dW for every segment, else
    # each segment's added under its mask into an fp32 (fp64) sum
    _reg("segmented_masked_linear_dx")
    _reg("segmented_masked_linear_dw")
    _linear = native("masked_linear")

    @registry.register("masked_qkv_proj", "cpu", ("cpu",), dtypes=_DTYPES)
    def masked_qkv_proj(x, weight, bits, bias, num_heads):
        b, t, d = x.shape
        return split_qkv(_linear(x.reshape(b * t, d), weight, bits, bias), b, t, num_heads)
