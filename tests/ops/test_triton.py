"""Triton kernels vs the reference: compiled on CUDA tensors where a GPU exists, else under
TRITON_INTERPRET=1 (set in conftest only without a GPU) on CPU tensors; small shapes, fp32."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lass_sparse as ls
from lass_sparse import reference
from lass_sparse.bitmask import pack_mask_reference
from lass_sparse.testing import assert_grads_like_reference, triton_device

pytestmark = [pytest.mark.triton, pytest.mark.skipif(
    not ls.backends()["triton"]["active"], reason="triton backend inactive: "
    + ls.backends()["triton"]["reason"])]

kernels = pytest.importorskip("lass_sparse.backends.triton.kernels")
TOL = dict(atol=1e-4, rtol=1e-4)
DEV = triton_device()  # where the triton backend registered its kernels here


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """The fp32 tolerances assume IEEE matmuls (torch's default; TF32 is opt-in)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(params=["fused", "cublas"])
def route(request, monkeypatch):
    """Both ways the GEMM-shaped ops run: the fused kernels, and W ⊙ M in one pass + a matmul
    (what a GPU takes from ``kernels.CUBLAS_MIN_M`` rows on)."""
    monkeypatch.setattr(kernels, "CUBLAS_MIN_M", 1 if request.param == "cublas" else 2**62)
    return request.param


def _case(m, n, k, p=None, device=DEV):
    x = torch.randn(m, k, device=device)
    w = torch.randn(n, k, device=device)
    masks = torch.rand(p or 1, n, k, device=device) > 0.5
    bits = torch.stack([pack_mask_reference(mm) for mm in masks])
    return x, w, masks, bits if p else bits[0]


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("k", [31, 64, 70])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.usefixtures("route")
def test_forward(m, k, bias):
    x, w, _, bits = _case(m, 40, k)
    b = torch.randn(40, device=DEV) if bias else None
    torch.testing.assert_close(kernels.masked_linear(x, w, bits, b),
                               reference.masked_linear(x, w, bits, b), **TOL)


@pytest.mark.parametrize("m,k", [(5, 33), (20, 64)])
@pytest.mark.usefixtures("route")
def test_dx_dw_and_accumulate(m, k):
    x, w, masks, bits = _case(m, 36, k)
    mask = masks[0]
    dy = torch.randn(m, 36, device=DEV)
    torch.testing.assert_close(kernels.masked_linear_dx(dy, w, bits), dy @ (w * mask), **TOL)
    dw = kernels.masked_linear_dw(dy, x, bits)
    torch.testing.assert_close(dw, (dy.T @ x) * mask, **TOL)
    assert not dw[~mask].any()
    grad = torch.randn(36, k, device=DEV)
    grad[~mask] = 7.0  # off-mask entries must be left alone
    want = grad + (dy.T @ x) * mask
    kernels.masked_linear_dw_accumulate_(grad, dy, x, bits)
    torch.testing.assert_close(grad, want, **TOL)
    assert (grad[~mask] == 7.0).all()


@pytest.mark.usefixtures("route")
def test_segmented_forward_and_backward():
    x, w, masks, bank = _case(23, 40, 45, p=3)
    offsets = torch.tensor([0, 7, 7, 15, 23], device=DEV)
    pairs = torch.tensor([2, 0, 0, 1], device=DEV)  # one empty segment, ids out of order
    b = torch.randn(40, device=DEV)
    y = kernels.segmented_masked_linear(x, w, bank, offsets, pairs, b)
    dy = torch.randn(23, 40, device=DEV)
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


@pytest.mark.usefixtures("route")
def test_qkv_projection_layout():
    bsz, t, d, h = 2, 5, 32, 4
    x = torch.randn(bsz, t, d, device=DEV)
    w = torch.randn(3 * d, d, device=DEV)
    bits = pack_mask_reference(torch.rand(3 * d, d, device=DEV) > 0.5)
    b = torch.randn(3 * d, device=DEV)
    got = kernels.masked_qkv_proj(x, w, bits, b, h)
    with ls.use_backend("reference"):
        want = ls.masked_qkv_proj(x, w, bits, b, h)
    with ls.use_backend("triton"):  # through the public op: outputs must not alias
        via_op = ls.masked_qkv_proj(x, w, bits, b, h)
    for g, o, r in zip(got, via_op, want):
        assert g.shape == (bsz, h, t, d // h)
        torch.testing.assert_close(g, r, **TOL)
        torch.testing.assert_close(o, r, **TOL)


@pytest.mark.usefixtures("route")
def test_ops_dispatch_to_triton_with_autograd():
    x, w, masks, bits = _case(9, 24, 40)
    x.requires_grad_(True)
    w.requires_grad_(True)
    from lass_sparse.ops import registry as _registry

    if DEV == "cpu":  # explicit only under the interpreter
        assert _registry.select("masked_linear", DEV, x, w, bits, None).backend == "cpu"
    with ls.use_backend("triton"):
        assert _registry.select("masked_linear", DEV, x, w, bits, None).backend == "triton"
        y = ls.masked_linear(x, w, bits)
        y.sum().backward()
    assert not w.grad[~masks[0]].any()
    assert_grads_like_reference(lambda: ls.masked_linear(x, w, bits).sum(), x, w, **TOL)


@pytest.mark.parametrize("n,k", [(1, 1), (37, 70), (40, 129)])
def test_apply_mask_and_accumulate_keep_off_mask_bits(n, k):
    w = torch.randn(n, k, device=DEV)
    mask = torch.rand(n, k, device=DEV) > 0.5
    bits = pack_mask_reference(mask)
    assert torch.equal(kernels.apply_mask(w, bits), torch.where(mask, w, 0.0))
    grad = torch.full((n, k), -0.0, device=DEV)  # off-mask -0.0 must stay -0.0, not become +0.0
    kernels.apply_mask(w, bits, out=grad, accumulate=True)
    assert torch.equal(grad[mask], w[mask])
    assert torch.equal(torch.signbit(grad[~mask]), torch.ones_like(grad[~mask], dtype=torch.bool))
    inplace = w.clone()
    assert kernels.apply_mask(inplace, bits, out=inplace) is inplace
    assert torch.equal(inplace, torch.where(mask, w, 0.0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU check: a GPU compiles them for real")
def test_every_candidate_compiles_with_the_runtime_signature_and_fits(tmp_path):
    """Lower the GEMM kernels (forward, dx, QKV), every autotuning candidate at BLOCK_M=128 (the
    most resources), to cubin for A100/H100 (no GPU needed), with the signature a launch really
    has; each must fit the shared memory of both and spill at most a few hundred bytes. (CI's
    .ci/nvcc_check.sh runs every variant and M bucket: `aot_check --all-configs`.)"""
    kernel_names = ["fwd", "dx", "qkv"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    procs = {arch: subprocess.Popen(
        [sys.executable, "-W", "ignore", "-m", "lass_sparse.backends.triton.aot_check",
         "--arch", str(arch), "--dtype", "bf16", "fp32", "tf32", "--all-configs",
         "--max-bucket-only", "--kernels", *kernel_names], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for arch in (80, 90)}
    n_variants = len(kernel_names)
    with ls.use_backend("reference"):
        per_dtype = {dt: len(kernels.candidates(getattr(torch, name), 128))
                     for dt, name in (("bf16", "bfloat16"), ("fp32", "float32"))}
    for arch, p in procs.items():
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        lines = [ln for ln in out.splitlines() if f"sm_{arch}:" in ln]
        assert all("regs=" in ln and "spill=" in ln and "smem=" in ln for ln in lines)
        assert sum(" bf16 " in ln for ln in lines) == n_variants * per_dtype["bf16"]
        assert sum(" fp32 " in ln for ln in lines) == n_variants * per_dtype["fp32"]
        assert sum(" tf32 " in ln for ln in lines) >= n_variants


_SIGNATURE_PROBE = """
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from lass_sparse.backends.triton import aot_check, kernels
name, attr, _, call = aot_check._variants()[0]
fn, args, kwargs = aot_check.capture(kernels, attr, call, torch.bfloat16, 4096, (128, 64, 64, 4, 3))
backend = make_backend(GPUTarget("cuda", 90, 32))
binder = create_function_from_signature(fn.signature, fn.params, backend)
bound, spec, opts = binder(*args, **dict(kwargs, debug=False))
_, sig, _, _ = fn._pack_args(backend, kwargs, bound, spec, opts)
print(repr(sig), bound["M"], bound["N"], bound["K"])
"""


def test_aot_signature_keeps_sizes_runtime_values():
    """M, N, K, NW are runtime ints (not constexpr 1): the K loop is compiled as it runs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", _SIGNATURE_PROBE], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sig_text, m, n, k = r.stdout.strip().rsplit(" ", 3)
    signature = eval(sig_text)  # noqa: S307 - our own repr of a dict of str
    for p in ("M", "N", "K", "NW", "sxm", "swn"):
        assert signature[p] in ("i32", "i64"), (p, signature[p])
    assert signature["x_ptr"] == "*bf16" and signature["bits_ptr"] == "*i32"
    assert (m, n, k) == ("4096", "4096", "4096")


def test_index_math_is_int64_past_2_31():
    """Row offsets (row × stride) and the QKV output offsets must not wrap in int32: M·K, N·K or
    3·B·T·D reach 2³¹ on real layers."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, base, stride, D, T, H, DH, BLOCK: tl.constexpr):
        r = base + tl.arange(0, BLOCK)
        tl.store(out_ptr + tl.arange(0, BLOCK), kernels._rows(r, stride))
        which, off = kernels._qkv_offsets(r, D + tl.arange(0, BLOCK), D, T, H, DH)
        tl.store(out_ptr + BLOCK + tl.arange(0, BLOCK), tl.sum(off, 1))
        tl.store(out_ptr + 2 * BLOCK + tl.arange(0, BLOCK), tl.max(which[None, :], 0))

    base, stride, blk = 2**20, 4096, 16  # rows ~1M x K=4096: offsets ~2^32
    d, t, h = 4096, 8192, 32
    dh = d // h
    base_qkv = 69 * t  # b = 69: (b*H + h)*T*Dh ~ 2.3e9
    out = torch.zeros(3 * blk, dtype=torch.int64, device=DEV)
    probe[(1,)](out, base, stride, d, t, h, dh, BLOCK=blk)
    rows = torch.arange(base, base + blk, dtype=torch.int64)
    assert out[:blk].cpu().tolist() == (rows * stride).tolist()
    assert int(out[:blk].max()) > 2**31
    probe[(1,)](out, base_qkv, stride, d, t, h, dh, BLOCK=blk)
    r = torch.arange(base_qkv, base_qkv + blk, dtype=torch.int64)
    cols = torch.arange(d, d + blk, dtype=torch.int64) % d  # the k block: which = 1
    b_idx, t_idx = r // t, r % t
    want = (((b_idx[:, None] * h + cols[None, :] // dh) * t + t_idx[:, None]) * dh
            + cols[None, :] % dh).sum(1)
    assert out[blk:2 * blk].cpu().tolist() == want.tolist()
    assert int(want.max()) > 2**31
    assert out[2 * blk:].cpu().tolist() == [1] * blk


def test_fp32_follows_torch_tf32_setting(monkeypatch):
    """IEEE fp32 dots by default (torch's default and our tolerances); TF32 only when torch's
    matmul setting allows it. The interpreter is always IEEE."""
    from lass_sparse.backends.triton import common

    matmul = torch.backends.cuda.matmul
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(common, "INTERPRET", False)  # _ieee lives there
    try:
        matmul.allow_tf32 = False
        assert kernels._ieee(torch.float32) is True
        ieee = kernels.candidates(torch.float32, 128)
        torch.set_float32_matmul_precision("high")  # the other spelling of "TF32 allowed"
        assert kernels._ieee(torch.float32) is False
        matmul.allow_tf32 = True
        assert kernels._ieee(torch.float32) is False
        assert kernels._ieee(torch.float64) is True
        # the candidates follow: IEEE fp32 gets small tiles (FMA dot), TF32 its own list
        tf32 = kernels.candidates(torch.float32, 128)
        assert tf32 != ieee and max(c[0] for c in ieee) <= kernels.IEEE_MAX_BLOCK_M
        monkeypatch.setattr(common, "INTERPRET", True)
        assert kernels._ieee(torch.float32) is True
    finally:
        torch.set_float32_matmul_precision("highest")
        matmul.allow_tf32 = False


def test_tuned_dw_allocates_no_scratch(monkeypatch):
    """The dW autotuner times candidates on a scratch buffer; once a key is tuned, no call
    allocates one again."""
    launches = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(k["ACCUMULATE"])

    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    monkeypatch.setattr(kernels, "_dw_kernel", FakeKernel())
    monkeypatch.setattr(kernels, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **k: fn() or 1.0)
    made = []
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: made.append(1) or real(*a, **k))
    x, w, _, bits = _case(8, 36, 64, device="cpu")
    grad = torch.zeros(36, 64)
    dy = torch.randn(8, 36)
    kernels.masked_linear_dw_accumulate_(grad, dy, x, bits)  # tunes: one scratch buffer
    assert len(made) == 1 and launches[-1] is True
    n_cands = len(kernels.candidates(torch.float32, 64))
    assert launches.count(False) == n_cands  # candidates timed on the scratch, not accumulating
    made.clear()
    launches.clear()
    kernels.masked_linear_dw_accumulate_(grad, dy, x, bits)
    kernels.masked_linear_dw(dy, x, bits)
    assert made == [] and launches == [True, False]


@pytest.mark.parametrize("tv,nv,broken", [("3.6.0", "2.4.1", True), ("3.6.0", "2.5.2", True),
                                          ("3.6.0", "2.3.5", False), ("3.9.0", "2.4.6", False),
                                          ("3.7.0+git12", "2.4.0", False)])
def test_interpreter_version_check(tv, nv, broken):
    from lass_sparse.backends.triton import interpreter_problem

    msg = interpreter_problem(tv, nv)
    assert (msg is not None) == broken
    if broken:
        assert "numpy<2.4" in msg and "triton>=3.7" in msg


def _adamw_lists(dtypes):
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 40), (5,), (3, 33), (0, 7)]
    ps = [torch.randn(s, generator=g).to(DEV, d) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(p.shape, generator=g).to(DEV, p.dtype) for p in ps]
    bits = [pack_mask_reference(torch.rand(6, 40, generator=g) < 0.5).to(DEV), None,
            pack_mask_reference(torch.rand(3, 33, generator=g) < 0.5).to(DEV), None]
    return ps, grads, bits


@pytest.mark.parametrize("maximize", [False, True])
def test_capturable_adamw_kernel_matches_the_reference(maximize):
    """The Triton capturable AdamW (one launch per param; lr and bias corrections read from
    the device) against the reference formula over three steps: fp32 to an ulp, off-mask
    entries and state bit-identical to before."""
    ps, grads, bits = _adamw_lists([torch.float32] * 4)
    out = {}
    for backend in ("reference", "triton"):
        p = [t.clone() for t in ps]
        m = [torch.zeros(t.shape, device=DEV) for t in ps]
        v = [torch.zeros(t.shape, device=DEV) for t in ps]
        steps = [torch.zeros((), device=DEV) for _ in ps]
        with ls.use_backend(backend):
            for _ in range(3):
                torch._foreach_add_(steps, 1)
                ls.masked_adamw_capturable_(p, grads, m, v, bits, state_steps=steps,
                                            lr=torch.tensor(1e-2, device=DEV), maximize=maximize)
        out[backend] = p + m + v
    for a, b in zip(out["reference"], out["triton"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for i, b in ((0, bits[0]), (2, bits[2])):
        keep = ls.unpack_mask(b, ps[i].shape[-1])
        assert torch.equal(out["triton"][i][~keep], ps[i][~keep])
        assert not out["triton"][4 + i][~keep].any() and not out["triton"][8 + i][~keep].any()


@pytest.mark.gpu
def test_capturable_adamw_kernel_bf16_on_gpu():
    """Compiled: bf16/fp16 params (fp32 state) within one rounding of the reference."""
    ps, grads, bits = _adamw_lists([torch.bfloat16, torch.float16, torch.bfloat16,
                                    torch.float32])
    out = {}
    for backend in ("reference", "triton"):
        p = [t.clone() for t in ps]
        m = [torch.zeros(t.shape, device=DEV) for t in ps]
        v = [torch.zeros(t.shape, device=DEV) for t in ps]
        steps = [torch.full((), 4.0, device=DEV) for _ in ps]
        with ls.use_backend(backend):
            ls.masked_adamw_capturable_(p, grads, m, v, bits, state_steps=steps,
                                        lr=torch.tensor(1e-2, device=DEV))
        out[backend] = p + m + v
    for a, b in zip(out["reference"], out["triton"]):
        tol = 1e-6 if a.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
