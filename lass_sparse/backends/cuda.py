"""CUDA C++ backend (csrc/cuda) through the compiled extension ``lass_sparse._cuda``: pack /
unpack, magnitude mask, decode GEMV (M <= 16) and the multi-tensor masked AdamW."""

from __future__ import annotations

import torch

from .. import _registry
from ._cuda_common import GEMV_MAX_M, SUFFIX

if not torch.cuda.is_available():
    _registry.set_status(
        "cuda", False,
        "no CUDA GPU visible to torch (torch.cuda.is_available() is False); install a CUDA build "
        "of torch on a GPU machine",
    )
else:
    try:
        from .. import _cuda  # noqa: F401  (registers lass_sparse_cuda::*)
    except ImportError as e:
        _registry.set_status(
            "cuda", False,
            f"the CUDA extension lass_sparse._cuda is not built ({e}); reinstall with nvcc on "
            "PATH and a CUDA torch (LASS_SPARSE_FORCE_CUDA_BUILD=1), or install cupy for the "
            "runtime-compiled path",
        )
    else:
        _ops = torch.ops.lass_sparse_cuda

        def _reg(op, supports=None):
            return _registry.register(op, "cuda", ("cuda",), supports=supports)

        _reg("pack_mask")(lambda mask: _ops.pack_mask(mask))
        _reg("unpack_mask")(lambda bits, k: _ops.unpack_mask(bits, k))

        @_reg("magnitude_mask", lambda w, *a: w.dtype in SUFFIX)
        def magnitude_mask(weight, alpha):
            from ..reference import magnitude_threshold

            thr = magnitude_threshold(weight, alpha)
            return _ops.magnitude_pack(weight, -1.0 if thr is None else float(thr))

        @_reg("masked_linear", lambda x, *a: x.dtype in SUFFIX and x.shape[0] <= GEMV_MAX_M)
        def masked_linear(x, weight, bits, bias):
            return _ops.decode_gemv(x, weight, bits, bias)

        @_reg("masked_adamw_", lambda ps, *a: len({p.dtype for p in ps}) == 1
              and ps[0].dtype in SUFFIX)
        def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps,
                          weight_decay, step, maximize):
            _ops.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2,
                               eps, weight_decay, step, maximize)

        _registry.set_status("cuda", True, "CUDA extension lass_sparse._cuda")
