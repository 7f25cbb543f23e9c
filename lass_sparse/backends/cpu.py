"""C++ CPU backend (csrc/cpu, OpenMP): registers the ``lass_sparse_cpu::*`` kernels for CPU
tensors. The linear kernels take float32, float64 and bfloat16 (fp32 accumulation), AdamW float32
and bfloat16 params, the magnitude mask float16 too; other calls are declined (``dtypes=``) and
fall through to the reference, or raise naming the dtype when the backend is forced."""

from __future__ import annotations

import torch

from .. import _registry
from ..reference import split_qkv

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
    _ops = torch.ops.lass_sparse_cpu
    _DTYPES = (torch.float32, torch.float64, torch.bfloat16)

    def _reg(op: str, dtypes=_DTYPES, validates: bool = False):
        return _registry.register(op, "cpu", ("cpu",), dtypes=dtypes, validates=validates)

    _reg("pack_mask", None)(lambda mask: _ops.pack_mask(mask))
    _reg("unpack_mask", None)(lambda bits, k: _ops.unpack_mask(bits, k))
    _reg("magnitude_mask", (*_DTYPES, torch.float16))(  # compares in fp32 for half types
        lambda w, alpha: _ops.magnitude_mask(w, alpha))

    # validates: these C++ entry points check every tensor before touching memory (common.h)
    @_reg("masked_linear", validates=True)
    def masked_linear(x, weight, bits, bias):
        return _ops.masked_linear(x, weight, bits, bias)

    @_reg("masked_linear_dx", validates=True)
    def masked_linear_dx(grad_out, weight, bits):
        return _ops.masked_linear_dx(grad_out, weight, bits)

    @_reg("masked_linear_dw", validates=True)
    def masked_linear_dw(grad_out, x, bits):
        return _ops.masked_linear_dw(grad_out, x, bits)

    @_reg("masked_linear_dw_accumulate_")  # dtypes of grad; x and grad_out are cast to it
    def masked_linear_dw_accumulate_(grad, grad_out, x, bits):
        _ops.masked_linear_dw_accumulate_(grad, grad_out.to(grad.dtype), x.to(grad.dtype), bits)

    def _segments(seg_offsets, seg_pair):
        offs = seg_offsets.tolist()
        return [(offs[i], offs[i + 1], p) for i, p in enumerate(seg_pair.tolist())
                if offs[i + 1] > offs[i]]

    @_reg("segmented_masked_linear")  # one pass over W's row tiles, every segment per tile
    def segmented_masked_linear(x, weight, bits_bank, seg_offsets, seg_pair, bias):
        return _ops.segmented_masked_linear(x, weight, bits_bank, seg_offsets, seg_pair, bias)

    @_reg("segmented_masked_linear_dx")
    def segmented_masked_linear_dx(grad_out, weight, bits_bank, seg_offsets, seg_pair):
        dx = torch.empty(grad_out.shape[0], weight.shape[1], dtype=grad_out.dtype)
        for lo, hi, p in _segments(seg_offsets, seg_pair):
            dx[lo:hi] = _ops.masked_linear_dx(grad_out[lo:hi], weight, bits_bank[p])
        return dx

    @_reg("segmented_masked_linear_dw")
    def segmented_masked_linear_dw(grad_out, x, bits_bank, seg_offsets, seg_pair):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dw = torch.zeros(bits_bank.shape[1], x.shape[1], dtype=acc)
        for lo, hi, p in _segments(seg_offsets, seg_pair):
            _ops.masked_linear_dw_accumulate_(dw, grad_out[lo:hi], x[lo:hi], bits_bank[p])
        return dw.to(x.dtype)

    @_reg("masked_qkv_proj")
    def masked_qkv_proj(x, weight, bits, bias, num_heads):
        b, t, d = x.shape
        return split_qkv(_ops.masked_linear(x.reshape(b * t, d), weight, bits, bias), b, t,
                         num_heads)

    @_reg("masked_adamw_", (torch.float32, torch.bfloat16), validates=True)
    def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps,
                      weight_decay, step, maximize):
        _ops.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps,
                           weight_decay, step, maximize)
