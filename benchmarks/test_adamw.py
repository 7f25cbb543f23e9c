"""Masked AdamW step: ours (one fused call over the list) vs dense torch.optim.AdamW vs the naive
way (dense AdamW, then restore off-mask p, exp_avg, exp_avg_sq from bool masks)."""

from __future__ import annotations

import pytest
import torch
from common import KEEP, adamw_stepper, tag, timed

N_PARAMS = 4


def _params(shape, dtype, device):
    n, k = shape
    ps = [torch.randn(n, k, dtype=dtype, device=device) for _ in range(N_PARAMS)]
    gs = [torch.randn_like(p) for p in ps]
    masks = [torch.rand(n, k, device=device) < KEEP for _ in ps]
    return ps, gs, masks


@pytest.mark.parametrize("impl", ["ours", "dense", "dense32", "naive"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_adamw_step(benchmark, impl, dtype, shape, device):
    """``dense``: torch AdamW with state in the param dtype; ``dense32`` (bf16 only): torch
    AdamW on fp32 master weights (fp32 state, as ours) copied back into the bf16 params."""
    if impl == "dense32" and dtype == "fp32":
        pytest.skip("dense32 is dense for fp32 params")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ps, gs, masks = _params(shape, dt, device)
    n, k = shape
    tag(benchmark, "masked_adamw", impl, device=device, dtype=dtype, params=N_PARAMS, N=n, K=k)
    before = [p.clone() for p in ps]
    step, ps = adamw_stepper(impl, ps, gs, masks, device)
    timed(benchmark, device, step)
    if impl in ("ours", "naive"):
        for p, p0, m in zip(ps, before, masks):
            assert torch.equal(p.detach()[~m], p0[~m]), "off-mask params must not change"
