"""masked_linear: forward and forward+backward, ours vs dense vs naive LaSS vs unpack-then-BLAS."""

from __future__ import annotations

import contextlib

import pytest
import torch
from common import (
    amp_layer_step,
    assert_close_to_ref,
    inputs,
    linear_impls,
    paired,
    tag,
    timed,
)

import lass_sparse as ls
from lass_sparse import reference
from lass_sparse.ops.registry import BackendCannotServe

IMPLS = ["ours", "dense", "naive", "unpack"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward(benchmark, impl, dtype, shape, m, device, is_smoke):
    _forward(benchmark, impl, dtype, shape, m, device, is_smoke)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "fused", "cupy"])  # "ours" is the default
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_gpu_backends(benchmark, backend, dtype, shape, m, device, monkeypatch):
    """Each GPU backend forced, next to test_forward's default dispatch in the same groups;
    ``fused``: the Triton GEMM kernels at every M (no W ⊙ M + cuBLAS route)."""
    with _forced(backend, monkeypatch):
        _forward(benchmark, f"ours[{backend}]", dtype, shape, m, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_backward_fused(benchmark, dtype, shape, m, device, monkeypatch):
    if m < 16:
        pytest.skip("training shapes only (M >= 16)")
    with _forced("fused", monkeypatch):
        test_forward_backward(benchmark, "ours[fused]", dtype, shape, m, device, False)


@pytest.mark.parametrize("impl", ["ours", "dense", "naive"])
@pytest.mark.parametrize("rows", [1, 8])
def test_backward_dx_few_rows(benchmark, impl, rows, shape, device):
    """bf16 dx = dy @ (W ⊙ M) of a few rows (CPU: AVX512-BF16 dot products over W row pairs
    under their mask words, no decoded copy of W) vs dense dy @ W and the naive dy @ (W * mask)."""
    n, k = shape
    _, w, mask, bits = inputs(rows, n, k, torch.bfloat16, device)
    dy = torch.randn(rows, n, dtype=torch.bfloat16, device=device)
    tag(benchmark, "masked_linear_dx", impl, device=device, dtype="bf16", M=rows, N=n, K=k)
    f = {"ours": lambda: torch.ops.lass_sparse.masked_linear_dx(dy, w, bits),
         "dense": lambda: dy @ w, "naive": lambda: dy @ (w * mask)}[impl]
    with torch.inference_mode():
        out = timed(benchmark, device, f)
    if impl == "ours":
        assert_close_to_ref(out, reference.masked_linear_dx(dy, w, bits))


@contextlib.contextmanager
def _forced(backend: str, monkeypatch):
    name = "triton" if backend == "fused" else backend
    if not ls.backends()[name]["active"]:
        pytest.skip(f"backend {name} inactive: {ls.backends()[name]['reason']}")
    if backend == "fused":
        from lass_sparse.backends.triton import kernels

        monkeypatch.setattr(kernels, "CUBLAS_MIN_M", 2**62)
    try:
        with ls.use_backend(name):
            yield
    except BackendCannotServe as e:  # e.g. cupy: decode GEMV only (M <= 16)
        pytest.skip(str(e).split(";")[0])


def _forward(benchmark, impl, dtype, shape, m, device, is_smoke=False):
    n, k = shape
    x, w, mask, bits = inputs(m, n, k, DTYPES[dtype], device)
    impls = linear_impls(w, mask, bits)
    f = impls[impl.split("[")[0]]
    tag(benchmark, "masked_linear", impl, device=device, dtype=dtype, M=m, N=n, K=k)
    benchmark.extra_info["flop"] = 2 * m * n * k
    benchmark.extra_info["bytes"] = w.numel() * w.element_size() + bits.numel() * 4
    with torch.inference_mode():
        out = timed(benchmark, device, f, x)
        if impl == "ours":
            paired(benchmark, device, lambda: f(x), lambda: impls["dense"](x), smoke=is_smoke)
    if impl != "dense":
        assert_close_to_ref(out, reference.masked_linear(x, w, bits, None))


def _fwd_bwd(impl: str, x, w, mask, bits):
    w = w.detach().requires_grad_(True)
    x = x.detach().requires_grad_(True)
    f = linear_impls(w, mask, bits)[impl.split("[")[0]]

    def step():
        w.grad = x.grad = None
        y = f(x)
        y.backward(torch.ones_like(y))
        return w.grad

    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_backward(benchmark, impl, dtype, shape, m, device, is_smoke):
    if m < 16 and not is_smoke:
        pytest.skip("training shapes only (M >= 16)")
    n, k = shape
    x, w, mask, bits = inputs(m, n, k, DTYPES[dtype], device)
    tag(benchmark, "masked_linear_fwd_bwd", impl, device=device, dtype=dtype, M=m, N=n, K=k)
    benchmark.extra_info["flop"] = 6 * m * n * k
    step = _fwd_bwd(impl, x, w, mask, bits)
    dw = timed(benchmark, device, step)
    if impl == "ours":
        dense = _fwd_bwd("dense", x, w, mask, bits)
        dense()
        paired(benchmark, device, step, dense, smoke=is_smoke)
    if impl != "dense":
        assert not dw[~mask].any(), "off-mask dW must be exactly zero"


@pytest.mark.parametrize("impl", ["ours", "ours_fused", "dense", "naive"])
def test_forward_backward_autocast(benchmark, impl, shape, m, device, is_smoke):
    """bf16 autocast, fp32 weights and grads (the CLI's training precision): ours (masked_cast,
    then F.linear, as the masked modules run it) against the route it replaced (cast, then
    masked_linear), dense and naive; paired ours/dense. dW off the mask must be exactly 0."""
    if m < 16 and not is_smoke:
        pytest.skip("training shapes only (M >= 16)")
    n, k = shape
    x, w, mask, bits = inputs(m, n, k, torch.bfloat16, device)
    step = amp_layer_step(impl, x, w.float(), mask, bits)
    tag(benchmark, "masked_linear_fwd_bwd_autocast", impl, device=device,
        dtype="bf16 autocast fp32 W", M=m, N=n, K=k)
    benchmark.extra_info["flop"] = 6 * m * n * k
    dw = timed(benchmark, device, step)
    if impl == "ours":
        dense = amp_layer_step("dense", x, w.float(), mask, bits)
        dense()
        paired(benchmark, device, step, dense, smoke=is_smoke)
    if impl != "dense":
        assert not dw[~mask].any(), "off-mask dW must be exactly zero"
        want = amp_layer_step("naive", x, w.float(), mask, bits)()
        torch.testing.assert_close(dw, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", ["ours", "bool", "numpy"])
def test_pack_mask(benchmark, impl, shape, device):
    if impl == "numpy" and device != "cpu":
        pytest.skip("numpy packs host memory")
    n, k = shape
    mask = torch.rand(n, k, device=device) < 0.3
    tag(benchmark, "pack_mask", impl, device=device, N=n, K=k)
    if impl == "ours":
        out = timed(benchmark, device, ls.pack_mask, mask)
        assert torch.equal(ls.unpack_mask(out, k), mask)
    elif impl == "bool":  # what the original stores: a bool copy per pair
        timed(benchmark, device, mask.clone)
    else:
        import numpy as np

        benchmark(np.packbits, mask.numpy(), axis=1, bitorder="little")


@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_unpack_mask(benchmark, impl, shape, device):
    n, k = shape
    bits = ls.pack_mask(torch.rand(n, k, device=device) < 0.3)
    f = ls.unpack_mask if impl == "ours" else reference.unpack_mask
    tag(benchmark, "unpack_mask", impl, device=device, N=n, K=k)
    out = timed(benchmark, device, f, bits, k)
    assert torch.equal(out, reference.unpack_mask(bits, k))


@pytest.mark.parametrize("impl", ["ours", "naive"])
def test_magnitude_mask(benchmark, impl, shape, device):
    """ours: packed bits on device; naive: the LaSS formula producing a bool mask."""
    n, k = shape
    w = torch.randn(n, k, device=device)
    alpha = 0.7
    tag(benchmark, "magnitude_mask", impl, device=device, N=n, K=k)

    def naive():
        a = w.abs()
        return a > a.flatten().kthvalue(int(alpha * a.numel())).values

    if impl == "ours":
        out = timed(benchmark, device, ls.magnitude_mask, w, alpha)
        assert torch.equal(ls.unpack_mask(out, k), naive())
    else:
        timed(benchmark, device, naive)
