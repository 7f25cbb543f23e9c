"""Mixed-pair batches: segmented_masked_linear with P pairs in one batch vs one masked call per
pair (ours, a loop), the naive per-pair bool-mask loop, and dense."""

from __future__ import annotations

import pytest
import torch
from common import KEEP, tag

import lass_sparse as ls
from lass_sparse import reference


@pytest.mark.parametrize("pairs", [1, 4, 16])
@pytest.mark.parametrize("impl", ["ours", "loop", "naive", "dense"])
def test_segmented(benchmark, impl, pairs, shape, is_smoke):
    n, k = shape
    t = 64 if is_smoke else 512
    x = torch.randn(t, k)
    w = torch.randn(n, k) / k**0.5
    masks = torch.rand(pairs, n, k) < KEEP
    bank = torch.stack([ls.pack_mask(m) for m in masks])
    bounds = torch.linspace(0, t, pairs + 1).long()
    seg_pair = torch.arange(pairs)
    tag(benchmark, "segmented_masked_linear", impl, pairs=pairs, T=t, N=n, K=k)
    benchmark.extra_info["flop"] = 2 * t * n * k
    segs = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    fns = {
        "ours": lambda: ls.segmented_masked_linear(x, w, bank, bounds, seg_pair),
        "loop": lambda: torch.cat([ls.masked_linear(x[a:b], w, bank[p])
                                   for p, (a, b) in enumerate(segs)]),
        "naive": lambda: torch.cat([x[a:b] @ (w * masks[p]).T for p, (a, b) in enumerate(segs)]),
        "dense": lambda: x @ w.T,
    }
    with torch.inference_mode():
        out = benchmark(fns[impl])
    if impl != "dense":
        with ls.use_backend("reference"):
            want = torch.cat([reference.masked_linear(x[a:b], w, bank[p], None)
                              for p, (a, b) in enumerate(segs)])
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
