"""C++ CPU backend specifics: both masked-linear paths (decode GEMV for small M, tiled
decode -> BLAS for large M), tails, bf16, dW accumulation and the masked AdamW twin."""

import math
import os

import pytest
import torch

import lass_sparse
from lass_sparse import reference
from lass_sparse.bitmask import pack_mask_reference, unpack_mask_reference
from lass_sparse.ops import registry as _registry
from lass_sparse.testing import cpu_kernels, record_backends

pytestmark = pytest.mark.skipif(
    not lass_sparse.backends()["cpu"]["active"], reason="C++ extension lass_sparse._C not built"
)


def test_cpu_kernels_are_selected_by_default():
    x, w = torch.randn(3, 40), torch.randn(8, 40)
    bits = pack_mask_reference(torch.rand(8, 40) > 0.5)
    for op, args in [("masked_linear", (x, w, bits, None)), ("pack_mask", (torch.ones(2, 3) > 0)),
                     ("magnitude_mask", (w, 0.5)), ("masked_adamw_", ([w],))]:
        assert _registry.select(op, "cpu", *args).backend == "cpu", op
    # float16 is declined and served by the reference
    assert _registry.select("masked_linear", "cpu", x.half()).backend == "reference"


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 15, 16, 17, 33, 300])
@pytest.mark.parametrize("k", [1, 31, 32, 33, 100, 517])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_masked_linear_paths_match_reference(m, k, dtype):
    n = 37
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype)
    mask = torch.rand(n, k) > 0.4
    bits = pack_mask_reference(mask)
    y = cpu_kernels.masked_linear(x, w, bits, b)
    exact = torch.nn.functional.linear(x.double(), (w * mask).double(), b.double())
    if dtype == torch.bfloat16:
        torch_err = (torch.nn.functional.linear(x, w * mask, b).double() - exact).abs().max()
        assert (y.double() - exact).abs().max() <= 2 * torch_err + 1e-6
    else:
        tol = (1e-5 if dtype == torch.float32 else 1e-12) * math.sqrt(k) * 4
        torch.testing.assert_close(y.double(), exact, atol=tol, rtol=1e-5)


def test_malformed_padding_bits_are_ignored_not_read_out_of_bounds():
    x, w = torch.randn(2, 33), torch.randn(5, 33)
    mask = torch.rand(5, 33) > 0.5
    bits = pack_mask_reference(mask)
    dirty = bits.clone()
    dirty[:, 1] |= -2  # set every padding bit of the last word
    y = cpu_kernels.masked_linear(x, w, dirty, None)
    torch.testing.assert_close(y, x @ (w * mask).T)


@pytest.mark.parametrize("m", [1, 4, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dx_dw_and_accumulate(m, dtype):
    n, k = 70, 129
    dy, x = torch.randn(m, n, dtype=dtype), torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype)
    mask = torch.rand(n, k) > 0.5
    bits = pack_mask_reference(mask)
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 0.1}[dtype]
    tol *= math.sqrt(max(m, n))
    dx = cpu_kernels.masked_linear_dx(dy, w, bits)
    torch.testing.assert_close(dx.double(), dy.double() @ (w * mask).double(), atol=tol, rtol=1e-2)
    dw = cpu_kernels.masked_linear_dw(dy, x, bits)
    assert torch.all(dw[~mask] == 0)
    want = (dy.double().T @ x.double()) * mask
    torch.testing.assert_close(dw.double(), want, atol=tol, rtol=1e-2)
    grad = torch.randn(n, k)
    before = grad.clone()
    cpu_kernels.masked_linear_dw_accumulate_(grad, dy, x, bits)
    assert torch.equal(grad[~mask], before[~mask])
    want = before.double() + (dy.double().T @ x.double()) * mask
    torch.testing.assert_close(grad.double(), want, atol=tol, rtol=1e-2)


def _adam_states(shapes, dtype=torch.float32):
    ps = [torch.randn(*s).to(dtype) for s in shapes]
    return ps, [torch.zeros(*s) for s in shapes], [torch.zeros(*s) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_adamw_cpu_twin_100_steps(dtype):
    shapes = [(16, 70), (9, 32), (70,)]
    masks = [torch.rand(16, 70) > 0.5, torch.rand(9, 32) > 0.3, None]
    bits = [None if m is None else pack_mask_reference(m) for m in masks]
    p_c, m_c, v_c = _adam_states(shapes, dtype)
    p_r, m_r, v_r = [p.clone() for p in p_c], [m.clone() for m in m_c], [v.clone() for v in v_c]
    p0 = [p.clone() for p in p_c]
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, maximize=False)
    for step in range(1, 101):
        grads = [torch.randn(*s).to(dtype) for s in shapes]
        with lass_sparse.use_backend("cpu"):
            lass_sparse.masked_adamw_(p_c, grads, m_c, v_c, bits, step=step, **hp)
        reference.masked_adamw_(p_r, grads, m_r, v_r, bits, hp["lr"], hp["beta1"], hp["beta2"],
                                hp["eps"], hp["weight_decay"], step, False)
    for i, mask in enumerate(masks):
        if mask is not None:  # off-mask: bit-identical to the start (p) and to zero (state)
            assert torch.equal(p_c[i][~mask], p0[i][~mask])
            assert torch.all(m_c[i][~mask] == 0) and torch.all(v_c[i][~mask] == 0)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(p_c[i].float(), p_r[i].float(), atol=tol, rtol=tol)
        torch.testing.assert_close(m_c[i], m_r[i], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v_c[i], v_r[i], atol=1e-7, rtol=1e-5)


def test_masked_adamw_cpu_matches_torch_adamw_on_masked_entries():
    mask = torch.rand(12, 50) > 0.5
    bits = pack_mask_reference(mask)
    p = torch.randn(12, 50)
    ref = p.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                            maximize=True)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 31):
        g = torch.randn(12, 50)
        with lass_sparse.use_backend("cpu"):
            lass_sparse.masked_adamw_([p], [g], [m], [v], [bits], lr=1e-2, weight_decay=0.1,
                                      step=step, maximize=True)
        ref.grad = g
        opt.step()
    torch.testing.assert_close(p[mask], ref.detach()[mask], atol=1e-5, rtol=1e-5)


def test_masked_adamw_cpu_rejects_bad_state():
    p = torch.randn(4, 40)
    bits = pack_mask_reference(torch.rand(4, 40) > 0.5)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] must be contiguous float32"):
        lass_sparse.masked_adamw_([p], [p.clone()], [torch.zeros(4, 40, dtype=torch.float64)],
                                  [torch.zeros(4, 40)], [bits], lr=1e-3, step=1)
    with pytest.raises(ValueError, match=r"bits\[0\] must be int32\[4, 2\]"):
        lass_sparse.masked_adamw_([p], [p.clone()], [torch.zeros(4, 40)], [torch.zeros(4, 40)],
                                  [bits[:, :1]], lr=1e-3, step=1)


@pytest.mark.parametrize("m", [4, 300])
def test_large_m_paths_with_grad_and_inference_mode(m):
    """Regression: the tiled path's at::mm_out ran through autograd (x requiring grad) and its
    buffers clashed with inference tensors."""
    torch.set_num_threads(2)  # worker threads do not inherit the caller's dispatch guards
    x = torch.randn(m, 1000, requires_grad=True)
    w = torch.randn(600, 1000, requires_grad=True)  # 2.4 MB: several tiles, both threads
    mask = torch.rand(600, 1000) > 0.5
    bits = pack_mask_reference(mask)
    y = lass_sparse.masked_linear(x, w, bits)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(y, reference.masked_linear(x, w, bits, None), atol=1e-4, rtol=1e-4)
    assert not w.grad[~mask].any()
    with torch.inference_mode():
        a = lass_sparse.masked_linear(x.detach(), w.detach(), bits)
    b = lass_sparse.masked_linear(x.detach(), w.detach(), bits)  # outside, after an inference call
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_segmented_tiles_outer_segments_inner_match_reference(dtype, bias):
    """Empty segments, a pair used twice, consecutive segments of one pair, K not a multiple of
    32, more rows than one tile."""
    t, n, k, p = 40, 300, 45, 3
    x, w = torch.randn(t, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    bank = torch.stack([pack_mask_reference(torch.rand(n, k) > 0.5) for _ in range(p)])
    offs = torch.tensor([0, 7, 7, 19, 30, 31, 40])
    pair = torch.tensor([2, 0, 1, 1, 0, 2])
    y = cpu_kernels.segmented_masked_linear(x, w, bank, offs, pair, b)
    want = torch.cat([reference.masked_linear(x[lo:hi], w, bank[q], b)
                      for lo, hi, q in zip(offs[:-1].tolist(), offs[1:].tolist(), pair.tolist())])
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y, want, atol=tol, rtol=tol)


def test_segmented_kernel_validates_what_it_reads():
    """Called directly (no Python checks before it): bad offsets or pair ids raise, never read
    out of bounds."""
    x, w = torch.randn(6, 40), torch.randn(8, 40)
    bank = torch.stack([pack_mask_reference(torch.rand(8, 40) > 0.5) for _ in range(2)])
    op = cpu_kernels.segmented_masked_linear
    bad = [(torch.tensor([0, 3, 7]), torch.tensor([0, 1]), "from 0 to T=6"),
           (torch.tensor([0, 4, 3, 6]), torch.tensor([0, 1, 0]), "non-decreasing"),
           (torch.tensor([0, 3, 6]), torch.tensor([0, 2]), r"in \[0, P=2\)"),
           (torch.tensor([0, 3, 6]), torch.tensor([-1, 0]), r"in \[0, P=2\)"),
           (torch.tensor([0, 6]), torch.tensor([0, 1]), "seg_offsets must be")]
    for offs, pair, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            op(x, w, bank, offs, pair, None)
    with pytest.raises(RuntimeError, match="bits_bank must be"):
        op(x, w, bank[:, :, :1], torch.tensor([0, 6]), torch.tensor([0]), None)


def test_masked_adamw_kernel_refuses_aliased_tensors():
    """The C++ entry point checks aliasing itself (the op then words the error in Python)."""
    p = torch.randn(4, 40)
    m, v = torch.zeros(4, 40), torch.zeros(4, 40)
    args = (1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False)
    with pytest.raises(RuntimeError, match="share memory"):
        cpu_kernels.masked_adamw_([p, p], [p.clone(), p.clone()], [m, m.clone()],
                                                [v, v.clone()], [None, None], *args)
    with pytest.raises(RuntimeError, match="share memory"):
        cpu_kernels.masked_adamw_([p], [p.clone()], [m], [m], [None], *args)
    g = torch.randn(4, 40)  # grads are read only: one grad for two params is fine
    cpu_kernels.masked_adamw_([p, p.clone()], [g, g], [m, m.clone()],
                                            [v, v.clone()], [None, None], *args)
    with pytest.raises(ValueError, match="share memory"):  # the op's own words
        lass_sparse.masked_adamw_([p, p], [p.clone(), p.clone()], [m, m.clone()],
                                  [v, v.clone()], [None, None], lr=1e-3, step=1)


def _adamw_steps(simd: bool) -> dict:
    """Ten masked AdamW steps (fp32 and bf16 params, masked and unmasked, maximize, tails) in a
    fresh process, with the AVX-512 path on or off."""
    import os
    import subprocess
    import sys

    code = r"""
import io, sys, torch, lass_sparse as ls
from lass_sparse.bitmask import pack_mask_reference, unpack_mask_reference
from lass_sparse.testing import cpu_kernels, record_backends
g = torch.Generator().manual_seed(0)
out = {}
for dt in (torch.float32, torch.bfloat16):
    for masked in (True, False):
        for maximize in (False, True):
            p = torch.randn(5, 75, generator=g).to(dt)
            m, v = torch.zeros(5, 75), torch.zeros(5, 75)
            bits = pack_mask_reference(torch.rand(5, 75, generator=g) > 0.4) if masked else None
            for step in range(1, 11):
                grad = (torch.randn(5, 75, generator=g) * 3).to(dt)
                grad[0, :3] = float("nan") if masked else grad[0, :3]
                ls.masked_adamw_([p], [grad], [m], [v], [bits], lr=1e-2, weight_decay=0.1,
                                 step=step, maximize=maximize)
            out[f"{dt}-{masked}-{maximize}"] = (p.float(), m, v)
buf = io.BytesIO(); torch.save(out, buf); sys.stdout.buffer.write(buf.getvalue())
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", LASS_SPARSE_CPU_SIMD="1" if simd else "0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    import io

    return torch.load(io.BytesIO(r.stdout))


def _small_bwd(simd: bool, threads: int) -> dict:
    """fp32 dx, dW and dW accumulation at 1-16 rows (small_m.cpp; 33 rows with its row limit
    raised: dx in blocks of 16), NaN/Inf in off-mask weights, in a fresh process with the SIMD
    path on or off and ``threads`` threads; every register blocking and partial 16-column
    chunk of the AVX-512 loops."""
    import os
    import subprocess
    import sys

    code = """
import io, sys, torch
from lass_sparse.bitmask import pack_mask_reference, unpack_mask_reference
from lass_sparse.testing import cpu_kernels
g = torch.Generator().manual_seed(0)
out = {}
for m, n, k in ((1, 70, 129), (3, 33, 64), (4, 300, 2048), (2, 5, 31), (6, 9, 200),
                (8, 130, 1000), (16, 21, 77), (12, 40, 129), (33, 7, 300)):
    dy, x, w = (torch.randn(*s, generator=g) for s in ((m, n), (m, k), (n, k)))
    mask = torch.rand(n, k, generator=g) > 0.5
    w[~mask] = float("nan")
    bits = pack_mask_reference(mask)
    grad = torch.randn(n, k, generator=g)
    grad0 = grad.clone()
    cpu_kernels.masked_linear_dw_accumulate_(grad, dy, x, bits)
    dx, dw = cpu_kernels.masked_linear_dx(dy, w, bits), cpu_kernels.masked_linear_dw(dy, x, bits)
    want_dw = torch.where(mask, dy.double().T @ x.double(), 0).float()
    ok = (torch.allclose(dx, (dy.double() @ torch.where(mask, w, 0).double()).float(),
                         atol=1e-4, rtol=1e-4)
          and torch.allclose(dw, want_dw, atol=1e-4, rtol=1e-4) and not dw[~mask].any()
          and torch.allclose(grad, grad0 + want_dw, atol=1e-4, rtol=1e-4)
          and torch.equal(grad[~mask], grad0[~mask]))
    out[(m, n, k)] = (dx, dw, grad, ok)
buf = io.BytesIO(); torch.save(out, buf); sys.stdout.buffer.write(buf.getvalue())
"""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), LASS_SPARSE_CPU_SIMD="1" if simd else "0")
    env["LASS_SPARSE_CPU_SMALL_BWD_MAX_M"] = "40"  # 33 rows too
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    import io

    return torch.load(io.BytesIO(r.stdout))


def test_small_m_backward_simd_portable_and_thread_counts_agree_bit_for_bit():
    """small_m.cpp: the AVX-512 and portable loops (std::fma in the same order) give the same
    bits, with 1 or 2 threads; NaN in off-mask weights never reaches dx; results match the
    reference."""
    runs = [_small_bwd(True, 1), _small_bwd(False, 1), _small_bwd(True, 2)]
    for key, (dx, dw, acc, ok) in runs[0].items():
        assert not dx.isnan().any(), key
        assert ok, key  # against float64 products, off-mask dW 0, accumulation on the mask only
        for other in runs[1:]:
            for a, b in zip((dx, dw, acc), other[key][:3]):
                assert torch.equal(a, b), key


def test_masked_adamw_simd_and_portable_paths_agree_bit_for_bit():
    a, b = _adamw_steps(True), _adamw_steps(False)
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)), key


# ------------------------------------------------- the kernels under the public names (dispatcher)


def test_cpu_kernels_are_the_public_ops_cpu_kernels():
    for op in ("pack_mask", "unpack_mask", "magnitude_mask", "masked_cast", "masked_linear",
               "masked_linear_dx",
               "masked_linear_dw", "masked_linear_dw_accumulate_", "segmented_masked_linear",
               "segmented_masked_linear_dx", "segmented_masked_linear_dw", "masked_qkv_proj",
               "masked_adamw_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lass_sparse::{op}", "CPU"), op
    assert not hasattr(torch.ops.lass_sparse_cpu, "masked_linear"), "a second schema is back"


def test_masked_cast_reaches_the_cpu_kernel_without_the_python_body(monkeypatch):
    """masked_cast (also its backward) runs the C++ kernel straight from the dispatcher or the
    direct path: no Python body, no registry."""
    seen = record_backends(monkeypatch)
    w = torch.randn(3, 8, 40, requires_grad=True)
    bits = pack_mask_reference(torch.rand(3, 8, 40) > 0.5)
    y = lass_sparse.masked_cast(w, bits, torch.bfloat16)
    y.float().sum().backward()
    z = torch.ops.lass_sparse.masked_cast(w.detach(), bits, torch.float16)
    assert seen == []
    assert torch.equal(y, reference.masked_cast(w.detach(), bits, torch.bfloat16))
    assert torch.equal(z, reference.masked_cast(w.detach(), bits, torch.float16))
    assert torch.equal(w.grad, unpack_mask_reference(bits, 40).float())


def test_masked_cast_simd_and_portable_paths_equal_torchs_casts():
    """The AVX-512 rows and the portable loop (LASS_SPARSE_CPU_SIMD=0), each in a fresh
    process: every float pair, tails, Inf, denormals, -0, NaN on the mask, equal to torch's cast
    of the selected weight (NaN compared as NaN)."""
    import os
    import subprocess
    import sys

    code = r"""
import itertools, torch, lass_sparse as ls
from lass_sparse.bitmask import pack_mask_reference
g = torch.Generator().manual_seed(0)
fl = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
for src, dst in itertools.product(fl, fl):
    for shape in ((5, 40), (3, 2, 64), (7, 1), (130, 97), (2, 32)):
        w = (torch.randn(shape, generator=g) * 3e4).to(src)
        w.view(-1)[:4] = torch.tensor([float("inf"), 1e-40, float("nan"), -0.0]).to(src)
        keep = torch.rand(shape, generator=g) < 0.5
        keep.view(-1)[:4] = True
        got = ls.masked_cast(w, pack_mask_reference(keep), dst)
        want = torch.where(keep, w, torch.zeros((), dtype=src)).to(dst)
        assert torch.equal(got.isnan(), want.isnan()), (src, dst, shape)
        assert torch.equal(got.nan_to_num(1.0), want.nan_to_num(1.0)), (src, dst, shape)
        num = ~want.isnan()  # torch's own NaN bits differ between its vector and scalar casts
        assert torch.equal(got.signbit()[num], want.signbit()[num]), (src, dst, shape)
print("ok")
"""
    for simd in ("1", "0"):
        env = dict(os.environ, OMP_NUM_THREADS="1", LASS_SPARSE_CPU_SIMD=simd)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == "ok", (simd, r.stderr[-2000:])


@pytest.mark.parametrize("path", ["torch.ops", "public"])
def test_a_cpu_call_reaches_the_kernel_without_the_python_body(monkeypatch, path):
    seen = record_backends(monkeypatch)
    x, w = torch.randn(2, 3, 40), torch.randn(8, 40)
    bits = pack_mask_reference(torch.rand(8, 40) > 0.5)
    f = torch.ops.lass_sparse.masked_linear if path == "torch.ops" else lass_sparse.masked_linear
    with torch.no_grad():
        y = f(x, w, bits, None)
        f(x.transpose(0, 1), w, bits, None)  # any strides: the entry makes them contiguous
    assert seen == []
    torch.testing.assert_close(y, reference.masked_linear(x, w, bits, None))


def test_the_kernels_defer_to_the_op_body_for_inputs_they_do_not_take(monkeypatch):
    seen = record_backends(monkeypatch)
    x, w = torch.randn(5, 40, dtype=torch.float16), torch.randn(8, 40, dtype=torch.float16)
    bits = pack_mask_reference(torch.rand(8, 40) > 0.5)
    y = torch.ops.lass_sparse.masked_linear(x, w, bits, None)
    assert seen == ["reference"]  # float16: the registry's next backend
    assert torch.equal(y, reference.masked_linear(x, w, bits, None))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., K=40\]"):  # the op's words
        torch.ops.lass_sparse.masked_linear(x[:, :7], w, bits, None)


def test_forced_backends_reach_the_kernels_per_thread_and_from_the_env(monkeypatch):
    import threading

    seen = record_backends(monkeypatch)
    x, w = torch.randn(5, 40), torch.randn(8, 40)
    bits = pack_mask_reference(torch.rand(8, 40) > 0.5)
    ops = torch.ops.lass_sparse
    with lass_sparse.use_backend("reference"):
        ops.masked_linear(x, w, bits, None)
        with lass_sparse.use_backend("cpu"):
            ops.masked_linear(x, w, bits, None)  # the kernel itself: no registry
        ops.masked_linear_dx(x[:, :8].contiguous(), w, bits)
        other = threading.Thread(target=lambda: ops.masked_linear(x, w, bits, None))
        other.start()  # a new thread starts unforced (as the context variable)
        other.join()
    assert seen == ["reference", "reference"]
    ops.masked_linear(x, w, bits, None)
    assert len(seen) == 2
    monkeypatch.setenv(_registry.ENV_VAR, "reference")
    ops.masked_linear(x, w, bits, None)
    with lass_sparse.use_backend("cpu"):  # use_backend overrides the environment
        ops.masked_linear(x, w, bits, None)
    assert seen == ["reference"] * 3


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (64, 100), (65, 31), (130, 64)])
def test_bf16_dx_of_few_rows_matches_reference(monkeypatch, m, n, k):
    """The AVX512-BF16 dx of M <= 8 rows (row pairs interleaved, an odd last row, column tails;
    M = 9 takes the decode -> GEMM path; AMX off): within the tolerance rule of torch's own bf16
    matmul, off-mask weights (NaN here) never read."""
    from lass_sparse.testing import within_torch_error

    monkeypatch.setenv("LASS_SPARSE_CPU_AMX", "0")
    dy = torch.randn(m, n, dtype=torch.bfloat16)
    mask = torch.rand(n, k) > 0.4
    w = torch.randn(n, k, dtype=torch.bfloat16).masked_fill(~mask, float("nan"))
    bits = pack_mask_reference(mask)
    dx = cpu_kernels.masked_linear_dx(dy, w, bits)
    w0 = torch.where(mask, w, torch.zeros_like(w))
    ok, msg = within_torch_error(dx, dy @ w0, dy.double() @ w0.double())
    assert ok, msg


@pytest.mark.parametrize("k", [1, 31, 33, 200])
@pytest.mark.parametrize("n", [1, 5, 6, 7, 50])
@pytest.mark.parametrize("bias", [True, False])
def test_segmented_panel_kernel_matches_reference(monkeypatch, k, n, bias):
    """The fp32 panel kernel (AVX-512): segments shorter and longer than a 32-row panel, empty
    ones, a pair used twice, N not a multiple of its 6-row register tile; against float64 and
    against the BLAS path it replaces ($LASS_SPARSE_CPU_PANEL_GEMM=0)."""
    g = torch.Generator().manual_seed(k * 100 + n)
    offs = torch.tensor([0, 0, 3, 40, 41, 75, 75, 108])
    pid = torch.tensor([0, 2, 1, 1, 0, 2, 1])
    x = torch.randn(int(offs[-1]), k, generator=g)
    w = torch.randn(n, k, generator=g)
    masks = torch.rand(3, n, k, generator=g) > 0.4
    bank = torch.stack([pack_mask_reference(m) for m in masks])
    b = torch.randn(n, generator=g) if bias else None
    y = torch.ops.lass_sparse.segmented_masked_linear(x, w, bank, offs, pid, b)
    want = torch.empty(x.shape[0], n, dtype=torch.float64)
    for s in range(len(pid)):
        a, e = int(offs[s]), int(offs[s + 1])
        want[a:e] = x[a:e].double() @ (w * masks[pid[s]]).double().T
    if bias:
        want += b.double()
    torch.testing.assert_close(y.double(), want, atol=1e-4 * k**0.5, rtol=1e-5)
    monkeypatch.setenv("LASS_SPARSE_CPU_PANEL_GEMM", "0")
    y_blas = torch.ops.lass_sparse.segmented_masked_linear(x, w, bank, offs, pid, b)
    torch.testing.assert_close(y, y_blas, atol=1e-4 * k**0.5, rtol=1e-5)


@pytest.mark.parametrize("t,k", [(700, 1000), (128, 4100)])
def test_fp32_panel_forward_runs_k_in_blocks(monkeypatch, t, k):
    """The fp32 panel kernel with K in several blocks (the panels' block ~1 MB: 22 panels of a
    mixed-pair batch at K = 1000; 4 panels at K = 4100, one forward of 128 rows), the last
    block shorter, bias added once: against float64 and the BLAS path."""
    g = torch.Generator().manual_seed(t + k)
    n = 45
    offs = torch.tensor([0, 5, t // 2, t // 2, t]) if t != 128 else torch.tensor([0, t])
    pid = torch.tensor([1, 0, 2, 1]) if t != 128 else torch.tensor([0])
    x, w, b = torch.randn(t, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n)
    masks = torch.rand(3, n, k, generator=g) > 0.4
    bank = torch.stack([pack_mask_reference(mm) for mm in masks])
    if t == 128:
        y = torch.ops.lass_sparse.masked_linear(x, w, bank[0], b)
    else:
        y = torch.ops.lass_sparse.segmented_masked_linear(x, w, bank, offs, pid, b)
    want = torch.empty(t, n, dtype=torch.float64)
    for s in range(len(pid)):
        lo, hi = int(offs[s]), int(offs[s + 1])
        want[lo:hi] = x[lo:hi].double() @ (w.double() * masks[pid[s]]).T + b.double()
    torch.testing.assert_close(y.double(), want, atol=1e-4 * k**0.5, rtol=1e-5)
    monkeypatch.setenv("LASS_SPARSE_CPU_PANEL_GEMM", "0")
    y_blas = (torch.ops.lass_sparse.masked_linear(x, w, bank[0], b) if t == 128 else
              torch.ops.lass_sparse.segmented_masked_linear(x, w, bank, offs, pid, b))
    torch.testing.assert_close(y, y_blas, atol=1e-4 * k**0.5, rtol=1e-5)


@pytest.mark.parametrize("m", [1, 2, 5, 9, 16, 17, 33, 100])
@pytest.mark.parametrize("n,k", [(1, 40), (7, 33), (50, 64), (33, 200), (1101, 600)])
def test_bf16_panel_backward_kernels_match_reference(monkeypatch, m, n, k):
    """dx and dW in bf16 through the AVX512-BF16 dot-product kernels (panel_bf16.cpp, where the
    CPU has them; dW from one row, dx above 8): odd N (a row pair padded with zero), K not a
    multiple of 32, M odd (dy's last row pair padded), several
    256-column groups and 512-row chunks (1101 x 600); against
    float64, against the BLAS path ($LASS_SPARSE_CPU_PANEL_GEMM=0), off-mask dW exactly 0 and a
    NaN stored off the mask never reaching dx. (AMX off: test_amx_bf16_kernels_match_reference.)"""
    monkeypatch.setenv("LASS_SPARSE_CPU_AMX", "0")
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    dy = torch.randn(m, n, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    mask = torch.rand(n, k, generator=g) > 0.4
    w = torch.where(mask, torch.randn(n, k, generator=g), torch.nan).bfloat16()
    bits = pack_mask_reference(mask)
    dx = torch.ops.lass_sparse.masked_linear_dx(dy, w, bits)
    dw = torch.ops.lass_sparse.masked_linear_dw(dy, x, bits)
    wm = torch.where(mask, w.double(), 0.0)
    want_dx, want_dw = dy.double() @ wm, (dy.double().t() @ x.double()) * mask
    scale_dx, scale_dw = 1 + want_dx.abs().max(), 1 + want_dw.abs().max()
    assert torch.isfinite(dx).all()
    assert (dx.double() - want_dx).abs().max() <= 1e-2 * scale_dx
    assert (dw.double() - want_dw).abs().max() <= 1e-2 * scale_dw
    assert torch.equal(dw[~mask], torch.zeros(int((~mask).sum()), dtype=torch.bfloat16))
    monkeypatch.setenv("LASS_SPARSE_CPU_PANEL_GEMM", "0")
    dx_blas = torch.ops.lass_sparse.masked_linear_dx(dy, w, bits)
    dw_blas = torch.ops.lass_sparse.masked_linear_dw(dy, x, bits)
    assert (dx.double() - dx_blas.double()).abs().max() <= 1e-2 * scale_dx
    assert (dw.double() - dw_blas.double()).abs().max() <= 1e-2 * scale_dw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offsets,pairs", [([0, 0, 37, 37], [2, 1, 0]),  # one non-empty segment
                                           ([0, 10, 11, 37], [1, 0, 1]),
                                           ([0, 3, 40, 41, 75, 75, 108, 141],
                                            [0, 2, 1, 0, 1, 2, 0])])
@pytest.mark.parametrize("amx", ["1", "0"])
def test_segmented_backward_matches_reference(monkeypatch, dtype, offsets, pairs, amx):
    """The CPU segmented dx / dW (C++ entries): one non-empty segment through the masked_linear
    kernels (dW in the input dtype), several through an fp32 accumulator; bf16 on AMX tiles
    (where the CPU has them; segments shorter and longer than a tile, not on tile boundaries, a
    pair used again later) in one pass for every segment; against float64."""
    monkeypatch.setenv("LASS_SPARSE_CPU_AMX", amx)
    if amx == "1" and (dtype != torch.bfloat16 or not _amx()):
        pytest.skip("the AMX case: bf16 on a CPU with AMX tiles")
    g = torch.Generator().manual_seed(len(offsets) + len(pairs))
    t, n, k = offsets[-1], 50, 70
    dy, x = torch.randn(t, n, generator=g).to(dtype), torch.randn(t, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    masks = torch.rand(3, n, k, generator=g) > 0.4
    bank = torch.stack([pack_mask_reference(m) for m in masks])
    offs, pid = torch.tensor(offsets), torch.tensor(pairs)
    dx = torch.ops.lass_sparse.segmented_masked_linear_dx(dy, w, bank, offs, pid)
    dw = torch.ops.lass_sparse.segmented_masked_linear_dw(dy, x, bank, offs, pid)
    assert dx.dtype == dw.dtype == dtype
    want_dx = torch.zeros(t, k, dtype=torch.float64)
    want_dw = torch.zeros(n, k, dtype=torch.float64)
    for s, p in enumerate(pairs):
        a, e = offsets[s], offsets[s + 1]
        m = masks[p].double()
        want_dx[a:e] = dy[a:e].double() @ (w.double() * m)
        want_dw += (dy[a:e].double().t() @ x[a:e].double()) * m
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(dx.double(), want_dx, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(dw.double(), want_dw, atol=tol * 10, rtol=tol)
    off = ~masks[list(set(pairs))].any(0)  # entries no pair keeps: exactly zero
    assert not dw[off].any()
    if amx == "0":
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # AMX: the same bits with one thread (each sum in one thread)
    try:
        assert torch.equal(dx, torch.ops.lass_sparse.segmented_masked_linear_dx(
            dy, w, bank, offs, pid))
        assert torch.equal(dw, torch.ops.lass_sparse.segmented_masked_linear_dw(
            dy, x, bank, offs, pid))
    finally:
        torch.set_num_threads(prev)


def _amx() -> bool:
    return lass_sparse.backends()["cpu"]["active"] and torch.ops.lass_sparse_cpu.amx_bf16()


@pytest.mark.skipif(not _amx(), reason="this CPU (or OS) gives no AMX-BF16 tiles")
@pytest.mark.parametrize("m", [5, 16, 17, 33, 100, 512])
@pytest.mark.parametrize("n,k", [(1, 40), (7, 33), (50, 64), (33, 200), (130, 2100), (1101, 600)])
def test_amx_bf16_kernels_match_reference(monkeypatch, m, n, k):
    """bf16 forward (with and without bias), dx, dW and dW accumulated into an fp32 grad on AMX
    tiles (amx_bf16.cpp; N, K, M not multiples of the 16/32 tiles, several strips, groups, row
    blocks and column chunks): within torch's own bf16 error of float64; a NaN stored off the
    mask never read; off-mask dW exactly 0 and off-mask grad entries (NaN here) untouched;
    1 and 2 threads bit for bit; against the kernels AMX replaces ($LASS_SPARSE_CPU_AMX=0)."""
    from lass_sparse.testing import within_torch_error

    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    dy = torch.randn(m, n, generator=g).bfloat16()
    mask = torch.rand(n, k, generator=g) > 0.4
    w = torch.where(mask, torch.randn(n, k, generator=g), torch.nan).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    bits = pack_mask_reference(mask)
    wm = torch.where(mask, w, torch.zeros_like(w))
    grad0 = torch.where(mask, torch.randn(n, k, generator=g), torch.nan)
    op = torch.ops.lass_sparse

    def run():
        grad = grad0.clone()
        op.masked_linear_dw_accumulate_(grad, dy, x, bits)
        return (op.masked_linear(x, w, bits, b), op.masked_linear(x, w, bits, None),
                op.masked_linear_dx(dy, w, bits), op.masked_linear_dw(dy, x, bits), grad)

    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y, y0, dx, dw, grad = got = run()
        torch.set_num_threads(1)
        for a, c in zip(got, run()):
            assert torch.equal(a, c) or torch.equal(a.isnan(), c.isnan()) and torch.equal(
                a.nan_to_num(), c.nan_to_num())
    finally:
        torch.set_num_threads(prev)
    exact = {"y": x.double() @ wm.double().T + b.double(), "y0": x.double() @ wm.double().T,
             "dx": dy.double() @ wm.double(),
             "dw": (dy.double().T @ x.double()) * mask}
    same = {"y": F_linear(x, wm, b), "y0": F_linear(x, wm, None), "dx": dy @ wm,
            "dw": (dy.T @ x) * mask}
    for name, val in (("y", y), ("y0", y0), ("dx", dx), ("dw", dw)):
        assert torch.isfinite(val).all(), name
        ok, msg = within_torch_error(val, same[name], exact[name])
        assert ok, f"{name}: {msg}"
    assert torch.equal(dw[~mask], torch.zeros(int((~mask).sum()), dtype=torch.bfloat16))
    assert grad[~mask].isnan().all()  # never read or written off the mask
    want = grad0.double() + exact["dw"]
    assert (grad[mask].double() - want[mask]).abs().max() <= 1e-5 * (1 + want[mask].abs().max())
    monkeypatch.setenv("LASS_SPARSE_CPU_AMX", "0")
    assert not torch.ops.lass_sparse_cpu.amx_bf16()
    for name, val, other in zip(("y", "y0", "dx", "dw"), (y, y0, dx, dw), run()[:4]):
        scale = 1 + exact[name].abs().max()
        assert (val.double() - other.double()).abs().max() <= 2e-2 * scale, name


def F_linear(x, w, b):
    return torch.nn.functional.linear(x, w, b)


@pytest.mark.skipif(not _amx(), reason="this CPU (or OS) gives no AMX-BF16 tiles")
@pytest.mark.parametrize("k", [31, 200])
@pytest.mark.parametrize("n", [5, 50])
@pytest.mark.parametrize("bias", [True, False])
def test_segmented_amx_forward_matches_reference(monkeypatch, k, n, bias):
    """The bf16 segmented forward on AMX tiles: segments shorter and longer than 32 rows, not on
    16-row boundaries, empty ones, a pair used twice and non-adjacent; rows of one segment never
    written with another's mask; against float64 and the tiled path ($LASS_SPARSE_CPU_AMX=0)."""
    g = torch.Generator().manual_seed(k * 100 + n)
    offs = torch.tensor([0, 0, 3, 40, 41, 75, 75, 108])
    pid = torch.tensor([0, 2, 1, 1, 0, 2, 1])
    x = torch.randn(int(offs[-1]), k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    masks = torch.rand(3, n, k, generator=g) > 0.4
    bank = torch.stack([pack_mask_reference(mm) for mm in masks])
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    y = torch.ops.lass_sparse.segmented_masked_linear(x, w, bank, offs, pid, b)
    want = torch.empty(x.shape[0], n, dtype=torch.float64)
    for s in range(len(pid)):
        lo, hi = int(offs[s]), int(offs[s + 1])
        want[lo:hi] = x[lo:hi].double() @ (w.double() * masks[pid[s]]).T
    if bias:
        want += b.double()
    tol = 2 ** -7 * (1 + want.abs().max())
    assert (y.double() - want).abs().max() <= tol
    monkeypatch.setenv("LASS_SPARSE_CPU_AMX", "0")
    y_tiled = torch.ops.lass_sparse.segmented_masked_linear(x, w, bank, offs, pid, b)
    assert (y.double() - y_tiled.double()).abs().max() <= tol


def test_the_amx_file_compiles_without_amx_intrinsics():
    """csrc/cpu/amx_bf16.cpp's stub branch (compilers without AMX intrinsics, other platforms,
    -DLASS_SPARSE_NO_AMX) still compiles: a syntax-only pass with the extension's flags."""
    import shutil
    import subprocess
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    inc = [f"-I{p}" for p in (*include_paths(), sysconfig.get_paths()["include"],
                              os.path.join(root, "csrc"))]
    r = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-DLASS_SPARSE_NO_AMX", *inc,
                        os.path.join(root, "csrc", "cpu", "amx_bf16.cpp")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
