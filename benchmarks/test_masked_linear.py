"""masked_linear: forward and forward+backward, ours vs dense vs naive LaSS vs unpack-then-BLAS."""

from __future__ import annotations

import pytest
import torch
from common import assert_close_to_ref, inputs, linear_impls, tag

import lass_sparse as ls
from lass_sparse import reference

IMPLS = ["ours", "dense", "naive", "unpack"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward(benchmark, impl, dtype, shape, m):
    n, k = shape
    x, w, mask, bits = inputs(m, n, k, DTYPES[dtype])
    f = linear_impls(w, mask, bits)[impl]
    tag(benchmark, "masked_linear", impl, dtype=dtype, M=m, N=n, K=k)
    benchmark.extra_info["flop"] = 2 * m * n * k
    benchmark.extra_info["bytes"] = w.numel() * w.element_size() + bits.numel() * 4
    with torch.inference_mode():
        out = benchmark(f, x)
    if impl != "dense":
        assert_close_to_ref(out, reference.masked_linear(x, w, bits, None))


def _fwd_bwd(impl: str, x, w, mask, bits):
    w = w.detach().requires_grad_(True)
    x = x.detach().requires_grad_(True)
    f = linear_impls(w, mask, bits)[impl]

    def step():
        w.grad = x.grad = None
        y = f(x)
        y.backward(torch.ones_like(y))
        return w.grad

    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_backward(benchmark, impl, dtype, shape, m, is_smoke):
    if m < 16 and not is_smoke:
        pytest.skip("training shapes only (M >= 16)")
    n, k = shape
    x, w, mask, bits = inputs(m, n, k, DTYPES[dtype])
    tag(benchmark, "masked_linear_fwd_bwd", impl, dtype=dtype, M=m, N=n, K=k)
    benchmark.extra_info["flop"] = 6 * m * n * k
    dw = benchmark(_fwd_bwd(impl, x, w, mask, bits))
    if impl != "dense":
        assert not dw[~mask].any(), "off-mask dW must be exactly zero"


@pytest.mark.parametrize("impl", ["ours", "bool", "numpy"])
def test_pack_mask(benchmark, impl, shape):
    n, k = shape
    mask = torch.rand(n, k) < 0.3
    tag(benchmark, "pack_mask", impl, N=n, K=k)
    if impl == "ours":
        out = benchmark(ls.pack_mask, mask)
        assert torch.equal(ls.unpack_mask(out, k), mask)
    elif impl == "bool":  # what the original stores: a bool copy per pair
        benchmark(mask.clone)
    else:
        import numpy as np

        benchmark(np.packbits, mask.numpy(), axis=1, bitorder="little")


@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_unpack_mask(benchmark, impl, shape):
    n, k = shape
    bits = ls.pack_mask(torch.rand(n, k) < 0.3)
    f = ls.unpack_mask if impl == "ours" else reference.unpack_mask
    tag(benchmark, "unpack_mask", impl, N=n, K=k)
    out = benchmark(f, bits, k)
    assert torch.equal(out, reference.unpack_mask(bits, k))


@pytest.mark.parametrize("impl", ["ours", "naive"])
def test_magnitude_mask(benchmark, impl, shape):
    """ours: packed bits on device; naive: the LaSS formula producing a bool mask."""
    n, k = shape
    w = torch.randn(n, k)
    alpha = 0.7
    tag(benchmark, "magnitude_mask", impl, N=n, K=k)

    def naive():
        a = w.abs()
        return a > a.flatten().kthvalue(int(alpha * a.numel())).values

    if impl == "ours":
        out = benchmark(ls.magnitude_mask, w, alpha)
        assert torch.equal(ls.unpack_mask(out, k), naive())
    else:
        benchmark(naive)
