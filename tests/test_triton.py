"""Triton kernels under TRITON_INTERPRET=1 (set in conftest): small shapes, fp32, vs reference."""

from __future__ import annotations

import pytest
import torch

import lass_sparse as ls
from lass_sparse import reference
from lass_sparse.bitmask import pack_mask_reference

pytestmark = [pytest.mark.triton, pytest.mark.skipif(
    not ls.backends()["triton"]["active"], reason="triton backend inactive: "
    + ls.backends()["triton"]["reason"])]

kernels = pytest.importorskip("lass_sparse.backends.triton.kernels")
TOL = dict(atol=1e-4, rtol=1e-4)


def _case(m, n, k, p=None, device="cpu"):
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    masks = torch.rand(p or 1, n, k) > 0.5
    bits = torch.stack([pack_mask_reference(mm) for mm in masks])
    return x, w, masks, bits if p else bits[0]


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("k", [31, 64, 70])
@pytest.mark.parametrize("bias", [False, True])
def test_forward(m, k, bias):
    x, w, _, bits = _case(m, 40, k)
    b = torch.randn(40) if bias else None
    torch.testing.assert_close(kernels.masked_linear(x, w, bits, b),
                               reference.masked_linear(x, w, bits, b), **TOL)


@pytest.mark.parametrize("m,k", [(5, 33), (20, 64)])
def test_dx_dw_and_accumulate(m, k):
    x, w, masks, bits = _case(m, 36, k)
    mask = masks[0]
    dy = torch.randn(m, 36)
    torch.testing.assert_close(kernels.masked_linear_dx(dy, w, bits), dy @ (w * mask), **TOL)
    dw = kernels.masked_linear_dw(dy, x, bits)
    torch.testing.assert_close(dw, (dy.T @ x) * mask, **TOL)
    assert not dw[~mask].any()
    grad = torch.randn(36, k)
    grad[~mask] = 7.0  # off-mask entries must be left alone
    want = grad + (dy.T @ x) * mask
    kernels.masked_linear_dw_accumulate_(grad, dy, x, bits)
    torch.testing.assert_close(grad, want, **TOL)
    assert (grad[~mask] == 7.0).all()


def test_segmented_forward_and_backward():
    x, w, masks, bank = _case(23, 40, 45, p=3)
    offsets = torch.tensor([0, 7, 7, 15, 23])
    pairs = torch.tensor([2, 0, 0, 1])  # one empty segment, ids out of order
    b = torch.randn(40)
    y = kernels.segmented_masked_linear(x, w, bank, offsets, pairs, b)
    dy = torch.randn(23, 40)
    dx = kernels.segmented_masked_linear_dx(dy, w, bank, offsets, pairs)
    dw = kernels.segmented_masked_linear_dw(dy, x, bank, offsets, pairs)
    want_dw = torch.zeros_like(w)
    for s, p in enumerate(pairs.tolist()):
        lo, hi = offsets[s].item(), offsets[s + 1].item()
        wm = w * masks[p]
        torch.testing.assert_close(y[lo:hi], x[lo:hi] @ wm.T + b, **TOL)
        torch.testing.assert_close(dx[lo:hi], dy[lo:hi] @ wm, **TOL)
        want_dw += (dy[lo:hi].T @ x[lo:hi]) * masks[p]
    torch.testing.assert_close(dw, want_dw, **TOL)


def test_qkv_projection_layout():
    bsz, t, d, h = 2, 5, 32, 4
    x = torch.randn(bsz, t, d)
    w = torch.randn(3 * d, d)
    bits = pack_mask_reference(torch.rand(3 * d, d) > 0.5)
    b = torch.randn(3 * d)
    got = kernels.masked_qkv_proj(x, w, bits, b, h)
    with ls.use_backend("reference"):
        want = ls.masked_qkv_proj(x, w, bits, b, h)
    for g, r in zip(got, want):
        assert g.shape == (bsz, h, t, d // h)
        torch.testing.assert_close(g, r, **TOL)


def test_ops_dispatch_to_triton_with_autograd():
    x, w, masks, bits = _case(9, 24, 40)
    x.requires_grad_(True)
    w.requires_grad_(True)
    from lass_sparse import _registry

    assert _registry.select("masked_linear", "cpu", x, w, bits, None).backend == "cpu"
    with ls.use_backend("triton"):
        assert _registry.select("masked_linear", "cpu", x, w, bits, None).backend == "triton"
        y = ls.masked_linear(x, w, bits)
        y.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with ls.use_backend("reference"):
        ls.masked_linear(x, w, bits).sum().backward()
    torch.testing.assert_close(gx, x.grad, **TOL)
    torch.testing.assert_close(gw, w.grad, **TOL)
    assert not gw[~masks[0]].any()


def test_kernels_compile_ahead_of_time_for_sm80_and_sm90(tmp_path):
    """Lower every kernel to cubin for A100/H100 targets (no GPU needed): catches what the
    interpreter cannot."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-m", "lass_sparse.backends.triton.aot_check",
                        "--arch", "80", "90", "--dtype", "bf16", "fp16", "fp32"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("sm_90") == r.stdout.count("sm_80") == 18
    r = subprocess.run([sys.executable, "-m", "lass_sparse.backends.triton.aot_check",
                        "--arch", "90", "--dtype", "bf16", "fp32", "--all-configs"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("sm_90") == 6 * 5 + 6 * 4  # every autotuning candidate compiles
