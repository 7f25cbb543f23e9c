"""Mixed-pair batches: segmented_masked_linear with P pairs in one batch vs one masked call per
pair (ours, a loop), the naive per-pair bool-mask loop, and dense."""

from __future__ import annotations

import pytest
import torch
from common import KEEP, paired, tag, timed

import lass_sparse as ls
from lass_sparse import reference


@pytest.mark.parametrize("pairs", [1, 4, 16])
@pytest.mark.parametrize("impl", ["ours", "loop", "naive", "dense"])
def test_segmented(benchmark, impl, pairs, shape, device, is_smoke):
    n, k = shape
    t = 64 if is_smoke else 4096 if device == "cuda" else 512
    x = torch.randn(t, k, device=device)
    w = torch.randn(n, k, device=device) / k**0.5
    masks = torch.rand(pairs, n, k, device=device) < KEEP
    bank = torch.stack([ls.pack_mask(m) for m in masks])
    bounds = torch.linspace(0, t, pairs + 1, device=device).long()
    seg_pair = torch.arange(pairs, device=device)
    tag(benchmark, "segmented_masked_linear", impl, device=device, pairs=pairs, T=t, N=n, K=k)
    benchmark.extra_info["flop"] = 2 * t * n * k
    segs = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    tol = 1e-4 if device == "cpu" else 2e-3  # TF32 may be on for the CUDA baselines
    fns = {
        "ours": lambda: ls.segmented_masked_linear(x, w, bank, bounds, seg_pair),
        "loop": lambda: torch.cat([ls.masked_linear(x[a:b], w, bank[p])
                                   for p, (a, b) in enumerate(segs)]),
        "naive": lambda: torch.cat([x[a:b] @ (w * masks[p]).T for p, (a, b) in enumerate(segs)]),
        "dense": lambda: x @ w.T,
    }
    with torch.inference_mode():
        out = timed(benchmark, device, fns[impl])
        if impl == "ours":
            paired(benchmark, device, fns["ours"], fns["dense"], smoke=is_smoke)
    if impl != "dense":
        with ls.use_backend("reference"):
            want = torch.cat([reference.masked_linear(x[a:b], w, bank[p], None)
                              for p, (a, b) in enumerate(segs)])
        torch.testing.assert_close(out, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("pairs", [1, 16])
@pytest.mark.parametrize("impl", ["ours", "dense"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_segmented_forward_backward(benchmark, impl, pairs, dtype, shape, device, is_smoke):
    """A mixed-pair training step of one layer (forward, dx, dW), P pairs in one batch, against
    the dense layer's step: no target; it shows what mixed-pair training costs (LaSS trains
    with batches grouped by pair, through masked_linear)."""
    n, k = shape
    t = 64 if is_smoke else 4096 if device == "cuda" else 512
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    x = torch.randn(t, k, device=device, dtype=dt, requires_grad=True)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dt).requires_grad_()
    masks = torch.rand(pairs, n, k, device=device) < KEEP
    bank = torch.stack([ls.pack_mask(m) for m in masks])
    bounds = torch.linspace(0, t, pairs + 1, device=device).long()
    seg_pair = torch.arange(pairs, device=device)
    tag(benchmark, "segmented_fwd_bwd", impl, device=device, dtype=dtype, pairs=pairs, T=t,
        N=n, K=k)
    benchmark.extra_info["flop"] = 6 * t * n * k

    def step(which):
        def run():
            x.grad = w.grad = None
            y = (ls.segmented_masked_linear(x, w, bank, bounds, seg_pair) if which == "ours"
                 else x @ w.T)
            y.backward(torch.ones_like(y))
            return w.grad
        return run

    dw = timed(benchmark, device, step(impl))
    if impl == "ours":
        paired(benchmark, device, step("ours"), step("dense"), smoke=is_smoke)
        assert not dw[~masks.any(0)].any(), "dW must be exactly zero where no pair keeps a weight"
