"""Property-based fuzzing of every op against a float64 oracle (issue 20).

Odd shapes (M = 0/1, K not a multiple of 32, N = 0/1, leading dims), fp32/bf16/fp16 where the
backend takes them, non-contiguous inputs; the reference and cpu backends, and Triton's
interpreter with tiny shapes and few examples. The tolerance is per element and sound for
fp32-accumulating kernels: ``|ours - oracle| <= 2 |torch - oracle| + 2 u_out |oracle|
+ (L + 2) u_acc bound`` where ``torch`` is torch's own result in the same dtype, ``u_out`` the
unit roundoff of the output dtype, ``L`` the accumulation length and ``bound`` the same sum over
absolute values. Off-mask dW is compared exactly (0), off-mask optimizer state bit-for-bit.

Bounded CI profile: deterministic (``derandomize``), no example database, example counts
scaled by ``$LASS_SPARSE_FUZZ_SCALE`` (default 1; e.g. 20 for a long local run, with
``LASS_SPARSE_FUZZ_RANDOM=1`` for fresh random examples).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lass_sparse
from lass_sparse.bitmask import num_words, pack_mask_reference

_SCALE = float(os.environ.get("LASS_SPARSE_FUZZ_SCALE", "1"))
_RANDOM = os.environ.get("LASS_SPARSE_FUZZ_RANDOM") == "1"


def fuzz(examples: int):
    return settings(
        max_examples=max(1, int(examples * _SCALE)), deadline=None, derandomize=not _RANDOM,
        database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )


ACTIVE = {n for n in ("reference", "cpu", "triton") if lass_sparse.backends()[n]["active"]}
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# (backend, dtype): what each backend takes (cpu declines fp16; Triton: fp32 in the interpreter)
LINEAR_COMBOS = [(b, d) for b, d in [("reference", F32), ("reference", BF16), ("reference", F16),
                                     ("cpu", F32), ("cpu", BF16), ("cpu", F64)] if b in ACTIVE]
# The *_triton_interpreter_* tests run the kernels on CPU tensors under TRITON_INTERPRET=1; on a
# GPU machine Triton serves CUDA tensors only (tests/ops/test_triton.py, tools/gpu_check.py).
TRITON = ["triton"] if "triton" in ACTIVE and not torch.cuda.is_available() else []
UNIT = {F64: 2.0**-53, F32: 2.0**-24, BF16: 2.0**-8, F16: 2.0**-11}


def _ids(combos):
    return [f"{b}-{str(d).replace('torch.', '')}" for b, d in combos]


# ---------------------------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _strided(t: torch.Tensor, how: int) -> torch.Tensor:
    """Same values, other strides: 0 contiguous, 1 transposed storage, 2 every other element."""
    if how == 0 or t.numel() == 0:
        return t
    if how == 1 and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    big = torch.stack([t, torch.zeros_like(t)], -1)  # stride 2 along the last dim
    return big[..., 0]


def _rand(gen, *shape, dtype=F32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _mask(gen, *shape, p=None):
    p = float(torch.rand(1, generator=gen)) if p is None else p
    return torch.rand(*shape, generator=gen) < p


def _select64(mask, w):
    return torch.where(mask, w.double(), 0.0)


def assert_near(ours, torch_same_dtype, oracle, bound, length, what=""):
    """The sound per-element bound of the module docstring (plus a tiny absolute floor)."""
    assert ours.shape == oracle.shape, (what, ours.shape, oracle.shape)
    assert ours.dtype == torch_same_dtype.dtype, (what, ours.dtype, torch_same_dtype.dtype)
    dt = ours.dtype
    u_acc = UNIT[F64] if dt == F64 else UNIT[F32]
    o = ours.double()
    err = (o - oracle).abs()
    tol = (2 * (torch_same_dtype.double() - oracle).abs() + 2 * UNIT[dt] * oracle.abs()
           + (length + 2) * u_acc * bound + 1e-30)
    bad = ~(err <= tol)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off, e.g. at {i}: ours "
            f"{o[tuple(i)].item()!r}, oracle {oracle[tuple(i)].item()!r}, torch "
            f"{torch_same_dtype[tuple(i)].item()!r}, tol {tol[tuple(i)].item()!r}")


# --------------------------------------------------------------------------- masked_linear

M_CHOICES = [0, 1, 2, 3, 5, 16, 17, 20]  # 16/17: the cpu decode GEMV / tiled BLAS boundary
K_CHOICES = [0, 1, 5, 31, 32, 33, 45, 64, 70]
N_CHOICES = [0, 1, 2, 7, 12]


@st.composite
def linear_cases(draw, small=False):
    m = draw(st.sampled_from([0, 1, 2, 3] if small else M_CHOICES))
    lead = (m,)
    if not small and m and draw(st.booleans()):
        lead = (1, m) if m == 1 or m % 2 else (2, m // 2)
    k = draw(st.sampled_from([1, 5, 33, 40] if small else K_CHOICES))
    n = draw(st.sampled_from([1, 2, 5] if small else N_CHOICES))
    return dict(lead=lead, n=n, k=k, bias=draw(st.booleans()),
                strides=draw(st.tuples(*[st.integers(0, 2)] * 3)),
                seed=draw(st.integers(0, 2**31 - 1)))


def _check_linear(backend, dtype, c):
    g = _gen(c["seed"])
    lead, n, k = c["lead"], c["n"], c["k"]
    x0, w0 = _rand(g, *lead, k, dtype=dtype), _rand(g, n, k, dtype=dtype)
    mask = _mask(g, n, k)
    bits0 = pack_mask_reference(mask)
    b = _rand(g, n, dtype=dtype) if c["bias"] else None
    dy = _rand(g, *lead, n, dtype=dtype)
    sx, sw, sb = c["strides"]
    x = _strided(x0, sx).requires_grad_()
    w = _strided(w0, sw).requires_grad_()
    bits = _strided(bits0, sb)
    with lass_sparse.use_backend(backend):
        y = lass_sparse.masked_linear(x, w, bits, b)
        y.backward(dy)
    # oracle (fp64) and torch's own result in this dtype, both on the pruned weight where(M, W, 0)
    wsel = torch.where(mask, w0, torch.zeros((), dtype=dtype))
    x64, w64, dy64 = x0.double(), _select64(mask, w0), dy.double()
    y64 = torch.nn.functional.linear(x64, w64, None if b is None else b.double())
    ybound = x64.abs() @ w64.abs().T + (0 if b is None else b.double().abs())
    assert_near(y.detach(), torch.nn.functional.linear(x0, wsel, b), y64, ybound, k, "y")
    dx64 = dy64 @ w64
    assert_near(x.grad, dy @ wsel, dx64, dy64.abs() @ w64.abs(), n, "dx")
    m = math.prod(lead)
    dy2, x2 = dy64.reshape(m, n), x64.reshape(m, k)
    dw64 = torch.where(mask, dy2.T @ x2, 0.0)
    dw_torch = torch.where(mask, dy.reshape(m, n).T @ x0.reshape(m, k),
                           torch.zeros((), dtype=dtype))
    assert_near(w.grad, dw_torch, dw64, dy2.abs().T @ x2.abs(), x2.shape[0], "dW")
    assert torch.equal(w.grad[~mask], torch.zeros(int((~mask).sum()), dtype=dtype))


@pytest.mark.parametrize("backend,dtype", LINEAR_COMBOS, ids=_ids(LINEAR_COMBOS))
@fuzz(50)
@given(c=linear_cases())
def test_masked_linear_fwd_bwd_vs_fp64(backend, dtype, c):
    _check_linear(backend, dtype, c)


@pytest.mark.triton
@pytest.mark.parametrize("backend", TRITON)
@fuzz(6)
@given(c=linear_cases(small=True))
def test_masked_linear_triton_interpreter_vs_fp64(backend, c):
    _check_linear(backend, F32, c)


# --------------------------------------------------------------------- accumulate (dW += )


@pytest.mark.parametrize("backend,dtype", LINEAR_COMBOS, ids=_ids(LINEAR_COMBOS))
@fuzz(30)
@given(c=linear_cases(), fp32_grad=st.booleans())
def test_dw_accumulate_vs_fp64(backend, dtype, c, fp32_grad):
    g = _gen(c["seed"])
    m, n, k = math.prod(c["lead"]), c["n"], c["k"]
    x, dy = _rand(g, m, k, dtype=dtype), _rand(g, m, n, dtype=dtype)
    mask = _mask(g, n, k)
    gdt = F32 if fp32_grad else dtype
    grad0 = _rand(g, n, k, dtype=gdt)
    grad = grad0.clone()
    with lass_sparse.use_backend(backend):
        torch.ops.lass_sparse.masked_linear_dw_accumulate_(
            grad, _strided(dy, c["strides"][0]), _strided(x, c["strides"][1]),
            _strided(pack_mask_reference(mask), c["strides"][2]))
    want64 = torch.where(mask, grad0.double() + dy.double().T @ x.double(), grad0.double())
    same = torch.where(mask, grad0 + (dy.to(gdt).T @ x.to(gdt)), grad0)
    bound = dy.double().abs().T @ x.double().abs() + grad0.double().abs()
    assert_near(grad, same, want64, bound, m, "grad")
    assert torch.equal(grad[~mask], grad0[~mask])


# ------------------------------------------------------------------------------ segmented


@st.composite
def segmented_cases(draw, small=False):
    t = draw(st.integers(0, 6 if small else 20))
    p = draw(st.integers(1, 3))
    s = draw(st.integers(1, 3 if small else 5))
    cuts = sorted(draw(st.lists(st.integers(0, t), min_size=s - 1, max_size=s - 1)))
    return dict(t=t, p=p, offsets=[0, *cuts, t],
                pairs=draw(st.lists(st.integers(0, p - 1), min_size=s, max_size=s)),
                k=draw(st.sampled_from([1, 33] if small else K_CHOICES)),
                n=draw(st.sampled_from([1, 3] if small else N_CHOICES)),
                bias=draw(st.booleans()), strided=draw(st.integers(0, 2)),
                seed=draw(st.integers(0, 2**31 - 1)))


def _check_segmented(backend, dtype, c):
    g = _gen(c["seed"])
    t, n, k, p = c["t"], c["n"], c["k"], c["p"]
    x0, w0 = _rand(g, t, k, dtype=dtype), _rand(g, n, k, dtype=dtype)
    masks = _mask(g, p, n, k)
    bank = pack_mask_reference(masks)
    b = _rand(g, n, dtype=dtype) if c["bias"] else None
    dy = _rand(g, t, n, dtype=dtype)
    offs, pair = torch.tensor(c["offsets"]), torch.tensor(c["pairs"])
    x = _strided(x0, c["strided"]).requires_grad_()
    w = _strided(w0, c["strided"]).requires_grad_()
    with lass_sparse.use_backend(backend):
        y = lass_sparse.segmented_masked_linear(x, w, _strided(bank, c["strided"]), offs, pair, b)
        y.backward(dy)
    y64, dx64 = torch.zeros(t, n, dtype=F64), torch.zeros(t, k, dtype=F64)
    yt, dxt = torch.zeros(t, n, dtype=dtype), torch.zeros(t, k, dtype=dtype)
    dw64, dwb = torch.zeros(n, k, dtype=F64), torch.zeros(n, k, dtype=F64)
    ybound, dxbound = torch.zeros(t, n, dtype=F64), torch.zeros(t, k, dtype=F64)
    union = torch.zeros(n, k, dtype=torch.bool)
    for lo, hi, q in zip(c["offsets"], c["offsets"][1:], c["pairs"]):
        ws64 = _select64(masks[q], w0)
        ws = torch.where(masks[q], w0, torch.zeros((), dtype=dtype))
        xs, dys = x0[lo:hi].double(), dy[lo:hi].double()
        y64[lo:hi] = xs @ ws64.T + (0 if b is None else b.double())
        yt[lo:hi] = torch.nn.functional.linear(x0[lo:hi], ws, b)
        ybound[lo:hi] = xs.abs() @ ws64.abs().T + (0 if b is None else b.double().abs())
        dx64[lo:hi] = dys @ ws64
        dxt[lo:hi] = dy[lo:hi] @ ws
        dxbound[lo:hi] = dys.abs() @ ws64.abs()
        dw64 += torch.where(masks[q], dys.T @ xs, 0.0)
        dwb += dys.abs().T @ xs.abs()
        union |= masks[q] & (hi > lo)
    assert_near(y.detach(), yt, y64, ybound, k, "y")
    assert_near(x.grad, dxt, dx64, dxbound, n, "dx")
    # torch's own dW in this dtype is not one expression here: compare with the fp64 oracle
    assert_near(w.grad, dw64.to(dtype), dw64, dwb, t, "dW")
    assert torch.equal(w.grad[~union], torch.zeros(int((~union).sum()), dtype=dtype))


@pytest.mark.parametrize("backend,dtype", LINEAR_COMBOS, ids=_ids(LINEAR_COMBOS))
@fuzz(30)
@given(c=segmented_cases())
def test_segmented_fwd_bwd_vs_fp64(backend, dtype, c):
    _check_segmented(backend, dtype, c)


@pytest.mark.triton
@pytest.mark.parametrize("backend", TRITON)
@fuzz(4)
@given(c=segmented_cases(small=True))
def test_segmented_triton_interpreter_vs_fp64(backend, c):
    _check_segmented(backend, F32, c)


# ---------------------------------------------------------------------------- fused QKV


@st.composite
def qkv_cases(draw, small=False):
    return dict(b=draw(st.integers(0, 2 if small else 3)),
                t=draw(st.integers(0, 2 if small else 6)),
                h=draw(st.sampled_from([1, 2] if small else [1, 2, 4])),
                dh=draw(st.sampled_from([1, 4] if small else [1, 3, 8, 9])),
                bias=draw(st.booleans()), strided=draw(st.integers(0, 2)),
                seed=draw(st.integers(0, 2**31 - 1)))


def _check_qkv(backend, dtype, c):
    g = _gen(c["seed"])
    bsz, t, h, d = c["b"], c["t"], c["h"], c["h"] * c["dh"]
    x0, w0 = _rand(g, bsz, t, d, dtype=dtype), _rand(g, 3 * d, d, dtype=dtype)
    mask = _mask(g, 3 * d, d)
    b = _rand(g, 3 * d, dtype=dtype) if c["bias"] else None
    douts = [_rand(g, bsz, h, t, c["dh"], dtype=dtype) for _ in range(3)]
    x = _strided(x0, c["strided"]).requires_grad_()
    w = _strided(w0, c["strided"]).requires_grad_()
    with lass_sparse.use_backend(backend):
        outs = lass_sparse.masked_qkv_proj(x, w, pack_mask_reference(mask), b, h)
        torch.autograd.backward(outs, douts)

    def heads(y):  # [B, T, 3D] -> three [B, H, T, Dh]
        return [y[..., i * d:(i + 1) * d].reshape(bsz, t, h, c["dh"]).transpose(1, 2)
                for i in range(3)]

    w64 = _select64(mask, w0)
    x64 = x0.double()
    y64 = torch.nn.functional.linear(x64, w64, None if b is None else b.double())
    bound = x64.abs() @ w64.abs().T + (0 if b is None else b.double().abs())
    yt = torch.nn.functional.linear(x0, torch.where(mask, w0, torch.zeros((), dtype=dtype)), b)
    for i, (o, o64, ot, ob) in enumerate(zip(outs, heads(y64), heads(yt), heads(bound))):
        assert o.shape == (bsz, h, t, c["dh"])
        assert_near(o.detach(), ot, o64, ob, d, f"qkv[{i}]")
    dy64 = torch.cat([o.double().transpose(1, 2).reshape(bsz, t, d) for o in douts], -1)
    dx64 = dy64 @ w64
    assert_near(x.grad, dx64.to(dtype), dx64, dy64.abs() @ w64.abs(), 3 * d, "dx")
    dy2, x2 = dy64.reshape(bsz * t, 3 * d), x64.reshape(bsz * t, d)
    dw64 = torch.where(mask, dy2.T @ x2, 0.0)
    assert_near(w.grad, dw64.to(dtype), dw64, dy2.abs().T @ x2.abs(), bsz * t, "dW")
    assert torch.equal(w.grad[~mask], torch.zeros(int((~mask).sum()), dtype=dtype))


@pytest.mark.parametrize("backend,dtype", LINEAR_COMBOS, ids=_ids(LINEAR_COMBOS))
@fuzz(25)
@given(c=qkv_cases())
def test_qkv_proj_fwd_bwd_vs_fp64(backend, dtype, c):
    _check_qkv(backend, dtype, c)


@pytest.mark.triton
@pytest.mark.parametrize("backend", TRITON)
@fuzz(4)
@given(c=qkv_cases(small=True))
def test_qkv_proj_triton_interpreter_vs_fp64(backend, c):
    _check_qkv(backend, F32, c)


# ---------------------------------------------------------------------------- masked AdamW

ADAMW_COMBOS = [(b, d) for b, d in [("reference", F32), ("reference", BF16), ("cpu", F32),
                                    ("cpu", BF16)] if b in ACTIVE]


@st.composite
def adamw_cases(draw):
    shapes = draw(st.lists(st.one_of(
        st.tuples(st.integers(0, 4), st.sampled_from([1, 5, 31, 33, 40, 64])),
        st.tuples(st.integers(1, 70)), st.tuples(st.integers(1, 2), st.integers(1, 3),
                                                 st.integers(1, 37))), min_size=1, max_size=3))
    return dict(shapes=shapes, masked=draw(st.lists(st.booleans(), min_size=3, max_size=3)),
                lr=draw(st.floats(0.0, 0.1)), beta1=draw(st.floats(0.0, 0.99)),
                beta2=draw(st.floats(0.0, 0.9999)), eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
                wd=draw(st.floats(0.0, 0.1)), step=draw(st.integers(1, 2000)),
                maximize=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend,dtype", ADAMW_COMBOS, ids=_ids(ADAMW_COMBOS))
@fuzz(40)
@given(c=adamw_cases())
def test_masked_adamw_vs_fp64(backend, dtype, c):
    g = _gen(c["seed"])
    ps, gs, ms, vs, bits, masks = [], [], [], [], [], []
    for i, shape in enumerate(c["shapes"]):
        ps.append(_rand(g, *shape, dtype=dtype))
        gs.append(_rand(g, *shape, dtype=dtype))
        ms.append(_rand(g, *shape) * 0.1)
        vs.append(torch.rand(*shape, generator=g) * 0.01)
        mk = _mask(g, *shape) if c["masked"][i] else torch.ones(shape, dtype=torch.bool)
        masks.append(mk)
        bits.append(pack_mask_reference(mk) if c["masked"][i] else None)
    p0 = [p.clone() for p in ps]
    m0, v0 = [m.clone() for m in ms], [v.clone() for v in vs]
    with lass_sparse.use_backend(backend):
        lass_sparse.masked_adamw_(ps, gs, ms, vs, bits, lr=c["lr"], beta1=c["beta1"],
                                  beta2=c["beta2"], eps=c["eps"], weight_decay=c["wd"],
                                  step=c["step"], maximize=c["maximize"])
    b1, b2, lr = c["beta1"], c["beta2"], c["lr"]
    bc1, bc2 = 1 - b1 ** c["step"], 1 - b2 ** c["step"]
    for i in range(len(ps)):
        keep = masks[i]
        gr = gs[i].double() * (-1 if c["maximize"] else 1)
        m64 = b1 * m0[i].double() + (1 - b1) * gr
        v64 = b2 * v0[i].double() + (1 - b2) * gr * gr
        upd = (m64 / bc1) / (v64.sqrt() / math.sqrt(bc2) + c["eps"])
        p64 = p0[i].double() * (1 - lr * c["wd"]) - lr * upd
        u = UNIT[F32]
        for name, ours, want, scale in (
                ("exp_avg", ms[i], m64, m0[i].double().abs() + gr.abs()),
                ("exp_avg_sq", vs[i], v64, v0[i].double().abs() + gr * gr)):
            err = (ours.double() - want).abs()[keep]
            assert bool((err <= 8 * u * scale[keep] + 1e-30).all()), (name, err.max())
        # p: fp32 math (a few ulps of |p| and of the step), then rounding to the param dtype
        tol = 64 * u * (p0[i].double().abs() + lr * upd.abs() + lr) + UNIT[dtype] * p64.abs()
        err = (ps[i].double() - p64).abs()
        assert bool((err[keep] <= tol[keep] + 1e-30).all()), ("p", (err - tol)[keep].max())
        for ours, before in ((ps[i], p0[i]), (ms[i], m0[i]), (vs[i], v0[i])):
            assert torch.equal(ours[~keep], before[~keep])  # bit-for-bit off the mask


# -------------------------------------------------------------------------- magnitude mask

MAG_COMBOS = [(b, d) for b, d in [("reference", F32), ("reference", BF16), ("reference", F16),
                                  ("cpu", F32), ("cpu", BF16), ("cpu", F16)] if b in ACTIVE]


@pytest.mark.parametrize("backend,dtype", MAG_COMBOS, ids=_ids(MAG_COMBOS))
@fuzz(30)
@given(lead=st.lists(st.integers(0, 4), max_size=2), k=st.sampled_from(K_CHOICES),
       alpha=st.floats(0.0, 0.999), ties=st.booleans(), strided=st.integers(0, 2),
       seed=st.integers(0, 2**31 - 1))
def test_magnitude_mask_exact_vs_fp64(backend, dtype, lead, k, alpha, ties, strided, seed):
    g = _gen(seed)
    shape = (*lead, k)
    w = (torch.randint(-3, 4, shape, generator=g).float() if ties
         else torch.randn(*shape, generator=g)).to(dtype)
    with lass_sparse.use_backend(backend):
        bits = lass_sparse.magnitude_mask(_strided(w, strided), alpha)
    a = w.double().abs()
    kth = int(alpha * w.numel())
    keep = (torch.ones(shape, dtype=torch.bool) if kth == 0
            else a > a.flatten().kthvalue(kth).values)
    assert bits.shape == (*lead, num_words(k)) and bits.dtype == torch.int32
    assert torch.equal(lass_sparse.unpack_mask(bits, k), keep)


# ---------------------------------------------------------------------------- pack / unpack


def _numpy_pack(mask: np.ndarray) -> np.ndarray:
    k = mask.shape[-1]
    b = np.packbits(mask, axis=-1, bitorder="little")
    pad = [(0, 0)] * (mask.ndim - 1) + [(0, 4 * num_words(k) - b.shape[-1])]
    return np.ascontiguousarray(np.pad(b, pad)).view("<i4")


@pytest.mark.parametrize("backend", sorted(ACTIVE - {"triton"}))
@fuzz(40)
@given(lead=st.lists(st.integers(0, 3), max_size=2), k=st.sampled_from(K_CHOICES + [95]),
       strided=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_vs_numpy(backend, lead, k, strided, seed):
    mask = _mask(_gen(seed), *lead, k)
    with lass_sparse.use_backend(backend):
        bits = lass_sparse.pack_mask(_strided(mask, strided))
        back = lass_sparse.unpack_mask(_strided(bits, strided), k)
    np.testing.assert_array_equal(bits.numpy(), _numpy_pack(mask.numpy()))
    assert torch.equal(back, mask)
