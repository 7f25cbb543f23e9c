"""Per-call overhead: tiny shapes where the kernels' work is ~1 µs, so a call's time is the
Python and dispatcher path around it (op checks, backend choice, autograd wrapper). Ours vs the
dense torch call of the same shape; report.py prints the ratio."""

from __future__ import annotations

import pytest
import torch
from common import adamw_stepper, assert_close_to_ref, inputs, linear_impls, tag, timed

from lass_sparse import reference

N, K = 64, 64
N_TENSORS = 50  # a small model's parameter list, as MaskedAdamW passes it each step


@pytest.mark.parametrize("impl", ["ours", "dense"])
@pytest.mark.parametrize("grad", ["fwd", "fwd+bwd"])
def test_call_overhead_linear(benchmark, impl, grad, device):
    x, w, mask, bits = inputs(1, N, K, torch.float32, device)
    tag(benchmark, "call_overhead", impl, device=device, call=f"masked_linear {grad}", M=1, N=N,
        K=K)
    f = linear_impls(w, mask, bits)[impl]
    if grad == "fwd":
        with torch.inference_mode():
            out = timed(benchmark, device, f, x)
        if impl == "ours":
            assert_close_to_ref(out, reference.masked_linear(x, w, bits, None))
        return
    w.requires_grad_(True)
    x.requires_grad_(True)

    def step():
        w.grad = x.grad = None
        f(x).sum().backward()
        return w.grad

    dw = timed(benchmark, device, step)
    if impl == "ours":
        assert not dw[~mask].any() and dw[mask].abs().sum() > 0


@pytest.mark.parametrize("impl", ["ours", "dense"])
def test_call_overhead_op_path(benchmark, impl, device):
    """The path torch.compile'd graphs, opcheck and dispatch modes take: torch.ops.lass_sparse
    (on CPU one dispatcher trip to the C++ kernel, past torch's custom-op autograd wrapper)."""
    x, w, mask, bits = inputs(1, N, K, torch.float32, device)
    tag(benchmark, "call_overhead", impl, device=device, call="masked_linear fwd via torch.ops",
        M=1, N=N, K=K)
    op = torch.ops.lass_sparse.masked_linear
    f = (lambda x: op(x, w, bits, None)) if impl == "ours" else (
        lambda x: torch.nn.functional.linear(x, w))
    with torch.inference_mode():
        out = timed(benchmark, device, f, x)
    if impl == "ours":
        assert_close_to_ref(out, reference.masked_linear(x, w, bits, None))


@pytest.mark.parametrize("impl", ["ours", "dense"])
def test_call_overhead_adamw(benchmark, impl, device):
    """One optimizer step over 50 small tensors: ours (one masked_adamw_ call) vs
    torch.optim.AdamW(foreach=True)."""
    tag(benchmark, "call_overhead", impl, device=device, call=f"adamw {N_TENSORS} tensors", N=N,
        K=K)
    ps = [torch.randn(N, K, device=device) for _ in range(N_TENSORS)]
    gs = [torch.randn_like(p) for p in ps]
    masks = [torch.rand(N, K, device=device) < 0.5 for _ in ps]
    before = [p.clone() for p in ps]
    step, ps = adamw_stepper(impl, ps, gs, masks, device)
    timed(benchmark, device, step)
    for p, p0, m in zip(ps, before, masks):
        changed = p.detach() != p0
        assert changed.any()
        if impl == "ours":
            assert not changed[~m].any(), "off-mask params must not change"
