"""Issue 29's "W as A" Triton variant (``LASS_SPARSE_TRITON_VARIANT=wt|wt_persistent|wt_tma``,
backends/triton/kernels_wt.py) vs the reference: forward (plain, split-K, persistent), dx
(plain, split-K), dW as one GEMM with the mask in the epilogue (+ accumulation that leaves
off-mask entries bit-identical), the one-launch segmented forward; and the default route's
segmented cuBLAS path holding one W ⊙ M transient, not one per pair. Compiled on a GPU, else
under TRITON_INTERPRET=1 with small shapes (fp32, IEEE)."""

from __future__ import annotations

import pytest
import torch

import lass_sparse as ls
from lass_sparse.bitmask import pack_mask_reference
from lass_sparse.testing import assert_grads_like_reference, triton_device

pytestmark = [pytest.mark.triton, pytest.mark.skipif(
    not ls.backends()["triton"]["active"], reason="triton backend inactive: "
    + ls.backends()["triton"]["reason"])]

kernels = pytest.importorskip("lass_sparse.backends.triton.kernels")
wt = pytest.importorskip("lass_sparse.backends.triton.kernels_wt")
TOL = dict(atol=1e-4, rtol=1e-4)
DEV = triton_device()


@pytest.fixture(autouse=True)
def _ieee_fp32(monkeypatch):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.delenv(wt.SPLIT_K_ENV, raising=False)
    monkeypatch.delenv(wt.VARIANT_ENV, raising=False)
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _case(m, n, k, p=None):
    x = torch.randn(m, k, device=DEV)
    w = torch.randn(n, k, device=DEV)
    masks = torch.rand(p or 1, n, k, device=DEV) > 0.5
    bits = torch.stack([pack_mask_reference(mm) for mm in masks])
    return x, w, masks, bits if p else bits[0]


@pytest.mark.parametrize("m,k,bias,split", [(1, 31, False, None), (17, 70, True, None),
                                            (5, 130, True, "3"), (33, 64, False, "2")])
def test_forward(monkeypatch, m, k, bias, split):
    if split:
        monkeypatch.setenv(wt.SPLIT_K_ENV, split)
    x, w, masks, bits = _case(m, 40, k)
    b = torch.randn(40, device=DEV) if bias else None
    want = x @ (w * masks[0]).T + (b if bias else 0)
    torch.testing.assert_close(wt.masked_linear(x, w, bits, b), want, **TOL)


def test_forward_persistent(monkeypatch):
    monkeypatch.setenv(wt.VARIANT_ENV, "wt_persistent")
    x, w, masks, bits = _case(35, 50, 45)  # 3 x 4 tiles over 4 programs: each walks several
    b = torch.randn(50, device=DEV)
    torch.testing.assert_close(wt.masked_linear(x, w, bits, b), x @ (w * masks[0]).T + b, **TOL)


@pytest.mark.parametrize("m,k,split,desc", [(35, 64, None, True), (5, 128, "2", True),
                                            (17, 45, None, False)])
def test_forward_tma_descriptor_for_x(monkeypatch, m, k, split, desc):
    """``wt_tma``: x tiles through a TMA tensor descriptor (rows past M and columns past K
    zero-filled by the unit), with split-K too; x rows not 16-byte aligned (K = 45 fp32) take
    the pointer loads."""
    monkeypatch.setenv(wt.VARIANT_ENV, "wt_tma")
    if split:
        monkeypatch.setenv(wt.SPLIT_K_ENV, split)
    kw = []
    real = wt._fwd_wt_kernel
    monkeypatch.setattr(wt, "_fwd_wt_kernel", type("K", (), {
        "__getitem__": lambda self, g: lambda *a, **k: (kw.append(k), real[g](*a, **k))})())
    x, w, masks, bits = _case(m, 50, k)
    b = torch.randn(50, device=DEV)
    torch.testing.assert_close(wt.masked_linear(x, w, bits, b), x @ (w * masks[0]).T + b, **TOL)
    assert kw and all(k["X_DESC"] is desc for k in kw)


def test_split_k_is_deterministic(monkeypatch):
    monkeypatch.setenv(wt.SPLIT_K_ENV, "3")
    x, w, _, bits = _case(3, 20, 96)
    dy = torch.randn(3, 20, device=DEV)
    assert torch.equal(wt.masked_linear(x, w, bits, None), wt.masked_linear(x, w, bits, None))
    assert torch.equal(wt.masked_linear_dx(dy, w, bits), wt.masked_linear_dx(dy, w, bits))


@pytest.mark.parametrize("m,n,split", [(5, 36, None), (20, 70, "2")])
def test_dx(monkeypatch, m, n, split):
    if split:
        monkeypatch.setenv(wt.SPLIT_K_ENV, split)
    _, w, masks, bits = _case(m, n, 45)
    dy = torch.randn(m, n, device=DEV)
    torch.testing.assert_close(wt.masked_linear_dx(dy, w, bits), dy @ (w * masks[0]), **TOL)


@pytest.mark.parametrize("m,k", [(5, 33), (20, 64)])
def test_dw_mask_in_epilogue_and_accumulate_keeps_off_mask_bits(m, k):
    x, _, masks, bits = _case(m, 36, k)
    mask = masks[0]
    dy = torch.randn(m, 36, device=DEV)
    dw = wt.masked_linear_dw(dy, x, bits)
    torch.testing.assert_close(dw, (dy.T @ x) * mask, **TOL)
    assert not dw[~mask].any()
    grad = torch.randn(36, k, device=DEV)
    grad[~mask] = -0.0  # off-mask: -0.0 stays -0.0, NaN stays NaN (never written)
    grad[~mask & (torch.rand(36, k, device=DEV) > 0.5)] = float("nan")
    before = grad.clone()
    want = grad + (dy.T @ x) * mask
    wt.masked_linear_dw_accumulate_(grad, dy, x, bits)
    torch.testing.assert_close(grad[mask], want[mask], **TOL)
    off = ~mask
    assert torch.equal(grad[off].view(torch.int32), before[off].view(torch.int32))


@pytest.mark.skipif(DEV == "cpu", reason="Triton's interpreter computes bf16 wrongly "
                    "(docs: ENVIRONMENT); the compiled kernel is checked on a GPU")
def test_dw_accumulates_into_fp32_grad_from_bf16():
    x, _, masks, bits = _case(6, 20, 40)
    dy = torch.randn(6, 20, device=DEV)
    xb, dyb = x.bfloat16(), dy.bfloat16()
    grad = torch.zeros(20, 40, device=DEV)
    wt.masked_linear_dw_accumulate_(grad, dyb, xb, bits)
    want = (dyb.float().T @ xb.float()) * masks[0]
    torch.testing.assert_close(grad, want, atol=1e-3, rtol=1e-3)


def test_segmented_forward_one_launch_device_tile_table(monkeypatch):
    x, w, masks, bank = _case(23, 40, 45, p=3)
    offsets = torch.tensor([0, 7, 7, 15, 23], device=DEV)
    pairs = torch.tensor([2, 0, 0, 1], device=DEV)  # one empty segment, ids out of order
    b = torch.randn(40, device=DEV)
    launches = []
    real = wt._seg_fwd_wt_kernel
    monkeypatch.setattr(wt, "_seg_fwd_wt_kernel", type("K", (), {
        "__getitem__": lambda self, g: (launches.append(g), real[g])[1]})())
    monkeypatch.setattr(kernels, "apply_mask", lambda *a, **k: pytest.fail("W ⊙ M written"))
    y = wt.segmented_masked_linear(x, w, bank, offsets, pairs, b)
    assert len(launches) == 1
    assert wt.tile_table(offsets, 16).tolist() == [1, 1, 2, 3]
    for s, p in enumerate(pairs.tolist()):
        lo, hi = offsets[s].item(), offsets[s + 1].item()
        torch.testing.assert_close(y[lo:hi], x[lo:hi] @ (w * masks[p]).T + b, **TOL)


def _spy_launches(monkeypatch, attr):
    launches = []
    real = getattr(wt, attr)
    monkeypatch.setattr(wt, attr, type("K", (), {
        "__getitem__": lambda self, g: (launches.append(g), real[g])[1]})())
    return launches


SEG_TABLES = [([0, 7, 7, 15, 23], [2, 0, 0, 1]),  # an empty segment, ids out of order
              ([0, 23], [1]),  # one segment
              ([0, 3, 5, 20, 23], [1, 1, 0, 2])]  # pair 1 twice in a row


@pytest.mark.parametrize("table", range(len(SEG_TABLES)))
@pytest.mark.parametrize("split", [None, "2", "3"])
def test_segmented_dx_one_launch(monkeypatch, table, split):
    if split:
        monkeypatch.setenv(wt.SPLIT_K_ENV, split)
    _, w, masks, bank = _case(23, 70, 45, p=3)
    offsets, pairs = (torch.tensor(v, device=DEV) for v in SEG_TABLES[table])
    dy = torch.randn(23, 70, device=DEV)
    launches = _spy_launches(monkeypatch, "_seg_dx_wt_kernel")
    monkeypatch.setattr(kernels, "apply_mask", lambda *a, **k: pytest.fail("W ⊙ M written"))
    dx = wt.segmented_masked_linear_dx(dy, w, bank, offsets, pairs)
    assert len(launches) == 1 and launches[0][2] == (int(split) if split else 1)
    for s, p in enumerate(pairs.tolist()):
        lo, hi = offsets[s].item(), offsets[s + 1].item()
        torch.testing.assert_close(dx[lo:hi], dy[lo:hi] @ (w * masks[p]), **TOL)


@pytest.mark.parametrize("table", range(len(SEG_TABLES)))
@pytest.mark.parametrize("split,parts", [(None, 1), ("2", 2), ("4", 3)])
def test_segmented_dw_one_launch_mask_per_segment(monkeypatch, table, split, parts):
    """Split over the rows (whole 32-row blocks under the interpreter: 70 rows in 4 -> 3
    parts); segments cross the parts' boundaries."""
    if split:
        monkeypatch.setenv(wt.SPLIT_K_ENV, split)
    x, _, masks, bank = _case(70, 20, 45, p=3)
    offs = [o * 3 if o < 23 else 70 for o in SEG_TABLES[table][0]]
    offsets, pairs = torch.tensor(offs, device=DEV), torch.tensor(SEG_TABLES[table][1], device=DEV)
    dy = torch.randn(70, 20, device=DEV)
    launches = _spy_launches(monkeypatch, "_seg_dw_wt_kernel")
    dw = wt.segmented_masked_linear_dw(dy, x, bank, offsets, pairs)
    assert len(launches) == 1 and launches[0][1] == parts
    want = torch.zeros(20, 45, device=DEV)
    for s, p in enumerate(pairs.tolist()):
        lo, hi = offsets[s].item(), offsets[s + 1].item()
        want += (dy[lo:hi].T @ x[lo:hi]) * masks[p]
    torch.testing.assert_close(dw, want, **TOL)
    union = masks[pairs[offsets[1:] > offsets[:-1]]].any(0)
    assert not dw[~union].any()


def test_segmented_backward_split_is_deterministic(monkeypatch):
    monkeypatch.setenv(wt.SPLIT_K_ENV, "3")
    x, w, _, bank = _case(40, 24, 96, p=2)
    offsets, pairs = torch.tensor([0, 9, 40], device=DEV), torch.tensor([1, 0], device=DEV)
    dy = torch.randn(40, 24, device=DEV)
    for f, args in ((wt.segmented_masked_linear_dx, (dy, w, bank, offsets, pairs)),
                    (wt.segmented_masked_linear_dw, (dy, x, bank, offsets, pairs))):
        assert torch.equal(f(*args), f(*args))


def test_segmented_backward_through_the_public_op(monkeypatch):
    """``wt`` serves the segmented op's backward too: grads equal the reference's."""
    monkeypatch.setenv(wt.VARIANT_ENV, "wt")
    used = []
    for name in ("segmented_masked_linear_dx", "segmented_masked_linear_dw"):
        real = getattr(wt, name)
        monkeypatch.setattr(wt, name, lambda *a, _r=real, _n=name: used.append(_n) or _r(*a))
    x, w, _, bank = _case(23, 24, 40, p=3)
    offsets, pairs = (torch.tensor(v, device=DEV) for v in SEG_TABLES[0])
    grads = []
    for backend in ("triton", "reference"):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with ls.use_backend(backend):
            ls.segmented_masked_linear(xg, wg, bank, offsets, pairs).square().sum().backward()
        grads.append((xg.grad, wg.grad))
    assert set(used) == {"segmented_masked_linear_dx", "segmented_masked_linear_dw"}
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, **TOL)


def test_segmented_entries_name_the_bad_argument():
    _, w, _, bank = _case(4, 8, 40, p=2)
    x = torch.randn(4, 40, device=DEV)
    dy = torch.randn(4, 8, device=DEV)
    offs, pairs = torch.tensor([0, 4], device=DEV), torch.tensor([0], device=DEV)
    with pytest.raises(ValueError, match="bits_bank must be int32"):
        wt.segmented_masked_linear_dx(dy, w, bank[0], offs, pairs)
    with pytest.raises(ValueError, match="grad_out must be"):
        wt.segmented_masked_linear_dx(torch.randn(4, 9, device=DEV), w, bank, offs, pairs)
    with pytest.raises(ValueError, match="seg_offsets must have"):
        wt.segmented_masked_linear_dw(dy, x, bank, offs[:1], pairs)
    with pytest.raises(ValueError, match="grad_out must be .T, N. and x"):
        wt.segmented_masked_linear_dw(dy[:3], x, bank, offs, pairs)
    with pytest.raises(TypeError, match="share one dtype"):
        wt.segmented_masked_linear_dw(dy.double(), x.double(), bank, offs, pairs)
    with pytest.raises(ValueError, match=r"bits_bank must be int32\[P, 8, 3\]"):
        wt.segmented_masked_linear_dw(dy, torch.randn(4, 70, device=DEV), bank, offs, pairs)


@pytest.mark.parametrize("variant", ["wt", "wt_persistent", "wt_tma"])
def test_variant_knob_routes_the_public_ops(monkeypatch, variant):
    monkeypatch.setenv(wt.VARIANT_ENV, variant)
    used = []
    for name in ("masked_linear", "masked_linear_dx", "masked_linear_dw"):
        real = getattr(wt, name)
        monkeypatch.setattr(wt, name, lambda *a, _r=real, _n=name, **k: used.append(_n)
                            or _r(*a, **k))
    x, w, masks, bits = _case(9, 24, 40)
    x.requires_grad_(True)
    w.requires_grad_(True)
    with ls.use_backend("triton"):
        y = ls.masked_linear(x, w, bits)
        y.sum().backward()
    assert set(used) == {"masked_linear", "masked_linear_dx", "masked_linear_dw"}
    assert not w.grad[~masks[0]].any()
    assert_grads_like_reference(lambda: ls.masked_linear(x, w, bits).sum(), x, w, **TOL)


def test_default_variant_is_v1_and_unknown_names_raise(monkeypatch):
    assert wt.variant() == "v1"
    assert kernels._variant_wt("masked_linear", 1, torch.zeros(1)) is None
    monkeypatch.setenv(wt.VARIANT_ENV, "fast")
    with pytest.raises(ValueError, match="LASS_SPARSE_TRITON_VARIANT"):
        kernels._variant_wt("masked_linear", 1, torch.zeros(1))
    monkeypatch.setenv(wt.VARIANT_ENV, "wt")
    assert kernels._variant_wt("masked_linear", 1, torch.zeros(1),
                               torch.zeros(1, dtype=torch.float64)) is None


def test_entries_name_the_bad_argument():
    x, w, _, bits = _case(4, 8, 40)
    with pytest.raises(ValueError, match="bits must be int32"):
        wt.masked_linear(x, w, bits[:, :1], None)
    with pytest.raises(ValueError, match="bias must be"):
        wt.masked_linear(x, w, bits, torch.zeros(3, device=DEV))
    with pytest.raises(ValueError, match="x must have unit stride"):
        wt.masked_linear(torch.randn(40, 4, device=DEV).T, w, bits, None)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        wt.masked_linear(x, None, bits, None)
    with pytest.raises(ValueError, match="grad_out must be"):
        wt.masked_linear_dx(torch.randn(4, 9, device=DEV), w, bits)
    with pytest.raises(ValueError, match="disagree"):
        wt.masked_linear_dw_accumulate_(torch.zeros(8, 41, device=DEV),
                                        torch.randn(4, 8, device=DEV), x, bits)
    with pytest.raises(ValueError, match="seg_offsets"):
        wt.segmented_masked_linear(x, w, bits[None], torch.tensor([0, 4, 4]),
                                   torch.tensor([0]), None)


def test_cublas_segmented_route_keeps_one_transient(monkeypatch):
    """The default route (v1) at >= CUBLAS_MIN_M rows per segment: W ⊙ M is written once per
    *pair*, into one buffer — not one live transient per pair."""
    monkeypatch.setattr(kernels, "CUBLAS_MIN_M", 1)
    x, w, masks, bank = _case(20, 24, 40, p=3)
    offsets = torch.tensor([0, 4, 9, 13, 20], device=DEV)
    pairs = torch.tensor([1, 0, 1, 2], device=DEV)  # pair 1 twice
    outs = []
    real = kernels.apply_mask

    def spy(src, bits, out=None, accumulate=False):
        if src is w:
            outs.append(out)
        return real(src, bits, out=out, accumulate=accumulate)

    monkeypatch.setattr(kernels, "apply_mask", spy)
    y = kernels.segmented_masked_linear(x, w, bank, offsets, pairs, None)
    dy = torch.randn(20, 24, device=DEV)
    dx = kernels.segmented_masked_linear_dx(dy, w, bank, offsets, pairs)
    assert len(outs) == 6 and all(o is outs[0] for o in outs[:3])
    assert all(o is outs[3] for o in outs[3:])
    for s, p in enumerate(pairs.tolist()):
        lo, hi = offsets[s].item(), offsets[s + 1].item()
        torch.testing.assert_close(y[lo:hi], x[lo:hi] @ (w * masks[p]).T, **TOL)
        torch.testing.assert_close(dx[lo:hi], dy[lo:hi] @ (w * masks[p]), **TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["wt", "wt_persistent", "wt_tma"])
@pytest.mark.parametrize("m", [1, 16, 64, 300])
def test_gpu_bf16_within_twice_torch_error(monkeypatch, variant, m):
    """On the device: bf16 forward/dx/dW of the variant within 2x torch's own bf16 error."""
    from lass_sparse.testing import within_torch_error

    monkeypatch.setenv(wt.VARIANT_ENV, variant)
    n, k = 512, 384
    x, w = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda") / k**0.5
    mask = torch.rand(n, k, device="cuda") > 0.5
    bits = ls.pack_mask(mask)
    dy = torch.randn(m, n, device="cuda")
    xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
    exact = (x.double() @ (w.double() * mask).T)
    ours = wt.masked_linear(xb, wb, bits, None)
    ok, msg = within_torch_error(ours, xb @ (wb * mask).T, exact)
    assert ok, msg
    ok, msg = within_torch_error(wt.masked_linear_dx(dyb, wb, bits), dyb @ (wb * mask),
                                 dy.double() @ (w.double() * mask))
    assert ok, msg
    dw = wt.masked_linear_dw(dyb, xb, bits)
    assert not dw[~mask].any()
    ok, msg = within_torch_error(dw, (dyb.T @ xb) * mask, (dy.double().T @ x.double()) * mask)
    assert ok, msg


@pytest.mark.gpu
@pytest.mark.parametrize("t", [12, 300, 2048])
def test_gpu_segmented_bf16_within_twice_torch_error(t):
    """On the device: the one-launch segmented forward, dx and dW in bf16 (split or not, by the
    heuristic at these sizes) within 2x torch's own bf16 error, per segment."""
    from lass_sparse.testing import within_torch_error

    n, k, p = 512, 384, 4
    x, w = torch.randn(t, k, device="cuda"), torch.randn(n, k, device="cuda") / k**0.5
    masks = torch.rand(p, n, k, device="cuda") > 0.5
    bank = torch.stack([ls.pack_mask(mm) for mm in masks])
    offsets = torch.linspace(0, t, p + 1, device="cuda").long()
    pairs = torch.tensor([2, 0, 3, 1], device="cuda")
    dy = torch.randn(t, n, device="cuda")
    xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
    y = wt.segmented_masked_linear(xb, wb, bank, offsets, pairs, None)
    dx = wt.segmented_masked_linear_dx(dyb, wb, bank, offsets, pairs)
    dw = wt.segmented_masked_linear_dw(dyb, xb, bank, offsets, pairs)
    want_dw, exact_dw = torch.zeros(n, k, device="cuda"), torch.zeros(n, k, device="cuda").double()
    for s, q in enumerate(pairs.tolist()):
        a, b = offsets[s].item(), offsets[s + 1].item()
        m = masks[q]
        ok, msg = within_torch_error(y[a:b], xb[a:b] @ (wb * m).T,
                                     x[a:b].double() @ (w.double() * m).T)
        assert ok, msg
        ok, msg = within_torch_error(dx[a:b], dyb[a:b] @ (wb * m),
                                     dy[a:b].double() @ (w.double() * m))
        assert ok, msg
        want_dw += (dyb[a:b].T @ xb[a:b]).float() * m
        exact_dw += (dy[a:b].double().T @ x[a:b].double()) * m
    assert not dw[~masks.any(0)].any()
    ok, msg = within_torch_error(dw, want_dw.bfloat16(), exact_dw)
    assert ok, msg
