"""Masked AdamW step: ours (one fused call over the list) vs dense torch.optim.AdamW vs the naive
way (dense AdamW, then restore off-mask p, exp_avg, exp_avg_sq from bool masks)."""

from __future__ import annotations

import pytest
import torch
from common import KEEP, tag, timed

import lass_sparse as ls

N_PARAMS = 4


def _params(shape, dtype, device):
    n, k = shape
    ps = [torch.randn(n, k, dtype=dtype, device=device) for _ in range(N_PARAMS)]
    gs = [torch.randn_like(p) for p in ps]
    masks = [torch.rand(n, k, device=device) < KEEP for _ in ps]
    return ps, gs, masks


@pytest.mark.parametrize("impl", ["ours", "dense", "naive"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_adamw_step(benchmark, impl, dtype, shape, device):
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ps, gs, masks = _params(shape, dt, device)
    n, k = shape
    tag(benchmark, "masked_adamw", impl, device=device, dtype=dtype, params=N_PARAMS, N=n, K=k)
    before = [p.clone() for p in ps]
    if impl == "ours":
        bits = [ls.pack_mask(m) for m in masks]
        ms = [torch.zeros(p.shape, device=device) for p in ps]
        vs = [torch.zeros(p.shape, device=device) for p in ps]
        state = {"step": 0}

        def step():
            state["step"] += 1
            ls.masked_adamw_(ps, gs, ms, vs, bits, lr=1e-3, step=state["step"])
    else:
        params = [torch.nn.Parameter(p) for p in ps]
        for p, g in zip(params, gs):
            p.grad = g
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        ps = params

        def step():
            if impl == "naive":
                old = [(p.detach().clone(), opt.state[p].get("exp_avg"),
                        opt.state[p].get("exp_avg_sq")) for p in params]
            opt.step()
            if impl == "naive":
                with torch.no_grad():
                    for p, m, (p0, m0, v0) in zip(params, masks, old):
                        p.copy_(torch.where(m, p, p0))
                        st = opt.state[p]
                        if m0 is not None:
                            st["exp_avg"].copy_(torch.where(m, st["exp_avg"], m0))
                            st["exp_avg_sq"].copy_(torch.where(m, st["exp_avg_sq"], v0))

    timed(benchmark, device, step)
    if impl != "dense":
        for p, p0, m in zip(ps, before, masks):
            assert torch.equal(p.detach()[~m], p0[~m]), "off-mask params must not change"
