"""The CUDA kernels under the public op names (csrc/cuda/binding.cpp, TORCH_LIBRARY_IMPL(
lass_sparse, CUDA)): one dispatcher trip to the kernel, deferral to the op body for calls that
are not theirs (more rows than the decode GEMV, float64, another backend forced), results
against the reference, and the kernels' own checks. Needs a GPU and the built extension."""

from __future__ import annotations

import math

import pytest
import torch

import lass_sparse
from lass_sparse import reference
from lass_sparse.bitmask import pack_mask_reference, unpack_mask_reference
from lass_sparse.testing import cuda_kernels, record_backends, require_backend

pytestmark = pytest.mark.gpu
CUDA_OPS = ("pack_mask", "unpack_mask", "magnitude_mask", "masked_cast", "masked_linear",
            "masked_linear_dx",
            "masked_linear_dw", "masked_linear_dw_accumulate_", "masked_qkv_proj", "masked_adamw_")


@pytest.fixture(autouse=True)
def _cuda_backend():
    require_backend("cuda")  # skips where the extension is not built; fails where it is broken


def _linear_args(m, k=200, n=96, dtype=torch.float32, lead=()):
    g = torch.Generator(device="cuda").manual_seed(m * 1000 + k)
    x = torch.randn(*lead, m, k, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g)
    bits = pack_mask_reference(torch.rand(n, k, device="cuda", generator=g) > 0.4)
    b = torch.randn(n, device="cuda", dtype=dtype, generator=g)
    return x, w, bits, b


def test_the_public_ops_have_cuda_kernels_and_no_second_namespace():
    for op in CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lass_sparse::{op}", "CUDA"), op
    assert "lass_sparse_cuda" not in {n.split("::")[0]
                                      for n in torch._C._dispatch_get_all_op_names()}


@pytest.mark.parametrize("path", ["torch.ops", "public"])
def test_a_decode_call_reaches_the_kernel_without_the_python_body(monkeypatch, path):
    seen = record_backends(monkeypatch)
    x, w, bits, b = _linear_args(4, lead=(2,))  # [2, 4, K]: 8 rows
    f = torch.ops.lass_sparse.masked_linear if path == "torch.ops" else lass_sparse.masked_linear
    with torch.no_grad():
        y = f(x, w, bits, b)
        y_t = f(x.transpose(0, 1), w, bits, b)  # any strides: the entry makes them contiguous
    assert seen == []
    torch.testing.assert_close(y, reference.masked_linear(x, w, bits, b))
    torch.testing.assert_close(y_t, reference.masked_linear(x.transpose(0, 1), w, bits, b))


def test_calls_that_are_not_the_kernels_go_to_the_op_body(monkeypatch):
    seen = record_backends(monkeypatch)
    x, w, bits, b = _linear_args(32)  # between the decode GEMV and the cuBLAS route: Triton
    y = torch.ops.lass_sparse.masked_linear(x, w, bits, b)
    assert seen and seen[-1] != "cuda"
    torch.testing.assert_close(y, reference.masked_linear(x, w, bits, b))
    seen.clear()
    x64, w64, _, b64 = (t.double() for t in _linear_args(3))
    y = torch.ops.lass_sparse.masked_linear(x64, w64, bits, b64)  # float64: not the kernel's
    assert seen and seen[-1] != "cuda"
    torch.testing.assert_close(y, reference.masked_linear(x64, w64, bits, b64))


@pytest.mark.parametrize("backend", ["triton", "cupy", "reference"])
def test_a_forced_backend_serves_the_call_not_the_kernel(monkeypatch, backend):
    if not lass_sparse.backends()[backend]["active"]:
        pytest.skip(f"{backend} inactive here")
    seen = record_backends(monkeypatch)
    x, w, bits, b = _linear_args(5)
    mask = torch.rand(3, 40, device="cuda") > 0.5
    with lass_sparse.use_backend(backend):
        y = torch.ops.lass_sparse.masked_linear(x, w, bits, b)
        assert seen == [backend]
        # pack_mask: the forced backend where it implements the op, else the default order
        packed = torch.ops.lass_sparse.pack_mask(mask)
    torch.testing.assert_close(y, reference.masked_linear(x, w, bits, b), atol=1e-4, rtol=1e-4)
    assert torch.equal(packed, pack_mask_reference(mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_mask_kernel_is_bit_exact(dtype, alpha):
    w = torch.randn(37, 70, device="cuda").to(dtype)
    w[0, :5] = 0.25  # ties at a threshold are pruned together
    assert torch.equal(cuda_kernels.magnitude_mask(w, alpha), reference.magnitude_mask(w, alpha))
    assert torch.equal(lass_sparse.magnitude_mask(w, alpha), reference.magnitude_mask(w, alpha))


def test_pack_and_unpack_kernels_are_bit_exact():
    mask = torch.rand(3, 5, 77, device="cuda") > 0.5
    bits = cuda_kernels.pack_mask(mask)
    assert torch.equal(bits, pack_mask_reference(mask))
    assert torch.equal(cuda_kernels.unpack_mask(bits, 77), mask)


def test_decode_kernel_refuses_what_it_does_not_take():
    x, w, bits, b = _linear_args(17)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        cuda_kernels.masked_linear(x, w, bits, b)
    with pytest.raises(RuntimeError, match="bits must be"):
        cuda_kernels.masked_linear(x[:4], w, bits[:, :1].contiguous(), b)
    # through the op: the body words the error
    with pytest.raises(ValueError, match="bits must be int32"):
        torch.ops.lass_sparse.masked_linear(x[:4], w, bits[:, :1].contiguous(), b)


def test_adamw_kernel_mixed_dtypes_and_masks_match_the_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [((70, 33), torch.float32, True), ((5,), torch.float32, False),
              ((40, 64), torch.bfloat16, True), ((300, 9), torch.float16, True)]
    ours, ref = [], []
    for shape, dtype, masked in shapes:
        p = torch.randn(*shape, device="cuda", generator=g).to(dtype)
        grad = torch.randn(*shape, device="cuda", generator=g).to(dtype)
        m = torch.rand(*shape, device="cuda", generator=g)
        v = torch.rand(*shape, device="cuda", generator=g)
        bits = (pack_mask_reference(torch.rand(*shape, device="cuda", generator=g) > 0.5)
                if masked else None)
        for lst in (ours, ref):
            lst.append([p.clone(), grad, m.clone(), v.clone(), bits])
    hp = (1e-2, 0.9, 0.999, 1e-8, 0.01, 3, False)
    cuda_kernels.masked_adamw_(*[list(c) for c in zip(*ours)], *hp)
    with lass_sparse.use_backend("reference"):
        torch.ops.lass_sparse.masked_adamw_(*[list(c) for c in zip(*ref)], *hp)
    for a, b in zip(ours, ref):
        tol = dict(atol=2e-2, rtol=2e-2) if a[0].dtype != torch.float32 else {}
        for t, r in zip(a[:1] + a[2:4], b[:1] + b[2:4]):  # p, exp_avg, exp_avg_sq
            torch.testing.assert_close(t, r, **tol)
        if a[4] is not None:  # off the mask: untouched, bit for bit
            off = ~unpack_mask_reference(a[4], a[0].shape[-1])
            assert torch.equal(a[0][off], b[0][off])


def test_adamw_kernel_refuses_aliased_state_and_leaves_params_alone():
    p = torch.randn(64, 64, device="cuda")
    p0, m = p.clone(), torch.zeros(64, 64, device="cuda")
    with pytest.raises(RuntimeError, match="share memory"):
        cuda_kernels.masked_adamw_([p], [torch.randn_like(p)], [m], [m], [None],
                                   1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False)
    assert torch.equal(p, p0)


# ---- the "mask, then cuBLAS" route in C++ (M >= cublas_min_m(), one dtype)

def _tol(dtype):
    return {} if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _misaligned(t):
    """A contiguous copy of ``t`` 2 bytes off 16-byte alignment (the apply-mask kernel's
    scalar path)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    return flat.view_as(t).copy_(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, k, aligned", [(64, 200, True), (300, 203, True), (80, 256, False)])
def test_the_cublas_route_runs_in_cpp_and_matches_the_reference(monkeypatch, dtype, m, k,
                                                                 aligned):
    """Forward, dx, dW and dW accumulation from the cuBLAS route's rows: one dispatcher trip to
    the C++ entry (the registry, i.e. the Python body, never runs), results as the reference;
    dW exactly 0 off the mask, the accumulation leaves off-mask entries bit for bit."""
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    from lass_sparse.backends import cuda

    if cuda.cublas_rows["masked_linear"] < 0 or m < cuda.cublas_rows["masked_linear"]:
        pytest.skip(f"cuBLAS route off or from more rows here: {cuda.cublas_rows}")
    seen = record_backends(monkeypatch)
    x, w, bits, b = _linear_args(m, k=k, dtype=dtype, lead=(1,))
    if not aligned:
        w = _misaligned(w)
    dy = torch.randn(m, w.shape[0], device="cuda", dtype=dtype)
    grad = torch.randn_like(w)
    grad0 = grad.clone()
    ops = torch.ops.lass_sparse
    y = ops.masked_linear(x, w, bits, b)
    dx = ops.masked_linear_dx(dy, w, bits)
    dw = ops.masked_linear_dw(dy, x[0], bits)
    ops.masked_linear_dw_accumulate_(grad, dy, x[0], bits)
    assert seen == []
    tol = _tol(dtype)
    torch.testing.assert_close(y, reference.masked_linear(x, w, bits, b), **tol)
    torch.testing.assert_close(dx, reference.masked_linear_dx(dy, w, bits), **tol)
    torch.testing.assert_close(dw, reference.masked_linear_dw(dy, x[0], bits), **tol)
    keep = unpack_mask_reference(bits, k)
    assert not dw[~keep].any()
    assert torch.equal(grad[~keep], grad0[~keep])
    torch.testing.assert_close(grad[keep], (grad0.float() + dw.float())[keep].to(dtype), **tol)


def test_the_cublas_route_never_uses_weights_off_the_mask(monkeypatch):
    """A select, not a product: NaN stored off the mask reaches neither y nor dx; NaN in
    grad_out leaves dW off the mask exactly 0."""
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    x, w, bits, b = _linear_args(128)
    keep = unpack_mask_reference(bits, w.shape[1])
    w = w.masked_fill(~keep, float("nan"))
    dy = torch.randn(128, w.shape[0], device="cuda")
    assert torch.isfinite(torch.ops.lass_sparse.masked_linear(x, w, bits, b)).all()
    assert torch.isfinite(torch.ops.lass_sparse.masked_linear_dx(dy, w, bits)).all()
    dw = torch.ops.lass_sparse.masked_linear_dw(dy.fill_(float("nan")), x, bits)
    assert torch.equal(dw[~keep], torch.zeros_like(dw[~keep]))


def test_a_training_step_on_the_cublas_route_runs_no_python_body(monkeypatch):
    """``lass_sparse.masked_linear`` with gradients (the C++ autograd node) at 256 rows:
    forward, dx and dW reach the C++ entries; a Triton variant set in the environment is
    left to the op body (the entries defer)."""
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    seen = record_backends(monkeypatch)
    x, w, bits, b = (t.requires_grad_(t.is_floating_point()) for t in _linear_args(256))
    lass_sparse.masked_linear(x, w, bits, b).square().sum().backward()
    assert seen == []
    want = [t.grad.clone() for t in (x, w, b)]
    x.grad = w.grad = b.grad = None
    with lass_sparse.use_backend("reference"):
        lass_sparse.masked_linear(x, w, bits, b).square().sum().backward()
    for got, ref in zip(want, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    if lass_sparse.backends()["triton"]["active"]:
        monkeypatch.setenv("LASS_SPARSE_TRITON_VARIANT", "v1")
        torch.ops.lass_sparse.masked_linear_dx(torch.randn(256, 96, device="cuda"), w.detach(),
                                               bits)
        assert seen == ["triton"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("t", [48, 1, 8])
def test_the_fused_qkv_projection_runs_in_cpp(monkeypatch, dtype, with_bias, t):
    """masked_qkv_proj from the cuBLAS route's rows (B*T = 96) and at decode rows (B*T = 2, 16:
    the decode GEMV, then the split): the C++ entry forward, the C++ dx / dW entries in its
    backward (no registry, i.e. no Python body), q, k, v contiguous [B, H, T, Dh]; values and
    grads as the reference."""
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    seen = record_backends(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(2, t, 64, device="cuda", generator=g).to(dtype).requires_grad_()
    w = torch.randn(192, 64, device="cuda", generator=g).to(dtype).requires_grad_()
    bits = pack_mask_reference(torch.rand(192, 64, device="cuda", generator=g) > 0.5)
    b = (torch.randn(192, device="cuda", generator=g).to(dtype).requires_grad_()
         if with_bias else None)
    leaves = [leaf for leaf in (x, w, b) if leaf is not None]

    def run():
        q, k, v = lass_sparse.masked_qkv_proj(x, w, bits, b, 4)
        (q.float().square().sum() + k.float().sum() + (2 * v.float()).sum()).backward()
        out = [o.detach() for o in (q, k, v)] + [leaf.grad.clone() for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        return out

    got = run()
    assert seen == []
    assert all(o.is_contiguous() and o.shape == (2, 4, t, 16) for o in got[:3])
    with lass_sparse.use_backend("reference"):
        want = run()
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n, k, aligned", [(1, 96, 200, True), (5, 300, 203, True),
                                              (16, 2048, 512, True), (8, 130, 256, False)])
def test_the_small_backward_kernels_run_in_cpp_and_match_the_reference(monkeypatch, dtype, m,
                                                                       n, k, aligned):
    """dx, dW and dW accumulation (into a grad of x's dtype and a float32 one) of at most 16
    rows: the C++ entries' small-M kernels (no registry call), results as the reference, dW
    exactly 0 off the mask, accumulation leaving off-mask entries bit for bit; dx split over
    N (2048 rows) repeats bitwise."""
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    from lass_sparse.backends import cuda

    if m > cuda.small_rows:
        pytest.skip(f"small-M kernels off or up to fewer rows here: {cuda.small_rows}")
    seen = record_backends(monkeypatch)
    x, w, bits, _ = _linear_args(m, k=k, n=n, dtype=dtype)
    if not aligned:
        w, x = _misaligned(w), _misaligned(x)
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    ops = torch.ops.lass_sparse
    dx = ops.masked_linear_dx(dy, w, bits)
    assert torch.equal(dx, ops.masked_linear_dx(dy, w, bits))
    dw = ops.masked_linear_dw(dy, x, bits)
    keep = unpack_mask_reference(bits, k)
    for grad_dtype in {dtype, torch.float32}:
        grad = torch.randn(n, k, device="cuda", dtype=grad_dtype).masked_fill(~keep, float("nan"))
        before = grad.clone()
        ops.masked_linear_dw_accumulate_(grad, dy, x, bits)
        bitview = torch.int32 if grad_dtype == torch.float32 else torch.int16
        assert torch.equal(grad.view(bitview)[~keep], before.view(bitview)[~keep])
        want = before.clone()
        reference.masked_linear_dw_accumulate_(want, dy, x, bits)
        torch.testing.assert_close(grad[keep], want[keep], **_tol(dtype))
    assert seen == []
    torch.testing.assert_close(dx, reference.masked_linear_dx(dy, w, bits), **_tol(dtype))
    torch.testing.assert_close(dw, reference.masked_linear_dw(dy, x, bits), **_tol(dtype))
    assert not dw[~keep].any()


def test_a_decode_sized_training_step_runs_no_python_body(monkeypatch):
    """``lass_sparse.masked_linear`` with gradients at 8 rows in bf16: the decode GEMV forward,
    the small-M dx and dW, all C++ entries; NaN off the mask reaches no gradient."""
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    seen = record_backends(monkeypatch)
    x, w, bits, b = _linear_args(8, k=512, n=256, dtype=torch.bfloat16)
    keep = unpack_mask_reference(bits, 512)
    x.requires_grad_()
    w = w.masked_fill(~keep, float("nan")).requires_grad_()
    b.requires_grad_()
    lass_sparse.masked_linear(x, w, bits, b).float().square().sum().backward()
    assert seen == []
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad[keep]).all()
    got = [t.grad.clone() for t in (x, w, b)]
    x.grad = w.grad = b.grad = None
    with lass_sparse.use_backend("reference"):
        lass_sparse.masked_linear(x, w, bits, b).float().square().sum().backward()
    for a, r in zip(got, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(a.float().nan_to_num(), r.float().nan_to_num(), atol=0.1,
                                   rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, offs, pairs", [(1, [0, 1], [2]), (5, [0, 0, 2, 5], [1, 0, 3]),
                                            (23, [0, 7, 7, 20, 23], [1, 1, 0, 1]),
                                            (64, [0, 16, 17, 40, 64], [3, 2, 1, 0])])
def test_the_segmented_decode_gemv_serves_mixed_pair_rows(monkeypatch, dtype, t, offs, pairs):
    """Mixed-pair rows of at most 64 (the server's decode steps): the registry picks the CUDA
    segmented GEMV, results as the reference (bias or not); more rows go to another kernel."""
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    seen = record_backends(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, 200, device="cuda", generator=g).to(dtype)
    w = torch.randn(96, 200, device="cuda", generator=g).to(dtype)
    b = torch.randn(96, device="cuda", generator=g).to(dtype)
    bank = pack_mask_reference(torch.rand(4, 96, 200, device="cuda", generator=g) > 0.5)
    o = torch.tensor(offs, device="cuda")
    p = torch.tensor(pairs, device="cuda")
    for bias in (b, None):
        with torch.no_grad():
            y = _seg_linear(x, w, bank, o, p, bias)
        assert seen[-1] == "cuda"
        torch.testing.assert_close(y, reference.segmented_masked_linear(x, w, bank, o, p, bias),
                                   **_tol(dtype))
    big = torch.randn(65, 200, device="cuda", dtype=dtype)
    with torch.no_grad():
        _seg_linear(big, w, bank, torch.tensor([0, 65], device="cuda"), p[:1], None)
    assert seen[-1] != "cuda"


def _seg_linear(*args):
    return lass_sparse.segmented_masked_linear(*args)


def test_the_segmented_decode_gemv_replays_in_a_cuda_graph_with_new_tables():
    """Captured with a table the host never read (built on the device), replayed after the
    table changes in place: the kernel reads it on the device at replay."""
    x = torch.randn(12, 64, device="cuda")
    w = torch.randn(32, 64, device="cuda")
    bank = pack_mask_reference(torch.rand(3, 32, 64, device="cuda") > 0.5)
    offs = torch.tensor([0, 5, 12], device="cuda") * 1  # device-built: unknown to the host
    pairs = torch.tensor([2, 0], device="cuda") * 1
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        _seg_linear(x, w, bank, offs, pairs, None)  # warm-up (reads and remembers nothing new)
    torch.cuda.current_stream().wait_stream(s)
    offs2, pairs2 = offs.clone(), pairs.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        y = _seg_linear(x, w, bank, offs2, pairs2, None)
    for new_offs, new_pairs in (([0, 5, 12], [2, 0]), ([0, 9, 12], [1, 2])):
        offs2.copy_(torch.tensor(new_offs))
        pairs2.copy_(torch.tensor(new_pairs))
        graph.replay()
        torch.testing.assert_close(y, reference.segmented_masked_linear(
            x, w, bank, torch.tensor(new_offs, device="cuda"),
            torch.tensor(new_pairs, device="cuda"), None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 40, 64])
def test_gemv_v3_serves_up_to_64_rows_in_cpp(monkeypatch, dtype, m):
    """LASS_SPARSE_CUDA_GEMV=v3 (read per call): the one-pair segmented GEMV from the C++ entry
    for up to 64 rows (no registry call), results as the reference; 65 rows are not its."""
    monkeypatch.setenv("LASS_SPARSE_CUDA_GEMV", "v3")
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    seen = record_backends(monkeypatch)
    x, w, bits, b = _linear_args(m, k=200, n=96, dtype=dtype)
    y = torch.ops.lass_sparse.masked_linear(x, w, bits, b)
    assert seen == []
    torch.testing.assert_close(y, reference.masked_linear(x, w, bits, b), **_tol(dtype))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [17, 40, 64])
def test_the_small_backward_kernels_take_up_to_64_rows_on_request(monkeypatch, dtype, m):
    """With the small-M rows raised to 64 (LASS_SPARSE_CUDA_SMALL_BWD_MAX_M): dx and dW of 17-64
    rows in chunks of 16 from the C++ entries, results as the reference."""
    from lass_sparse.backends import cuda

    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    old = cuda.small_rows
    cuda.set_small_bwd(cuda._mod, 64)
    try:
        seen = record_backends(monkeypatch)
        x, w, bits, _ = _linear_args(m, k=200, n=300, dtype=dtype)
        dy = torch.randn(m, 300, device="cuda", dtype=dtype)
        dx = torch.ops.lass_sparse.masked_linear_dx(dy, w, bits)
        dw = torch.ops.lass_sparse.masked_linear_dw(dy, x, bits)
        assert seen == []
        torch.testing.assert_close(dx, reference.masked_linear_dx(dy, w, bits), **_tol(dtype))
        torch.testing.assert_close(dw, reference.masked_linear_dw(dy, x, bits), **_tol(dtype))
    finally:
        cuda.set_small_bwd(cuda._mod, old)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_masked_cast_equals_torchs_cast_of_the_masked_weight(monkeypatch, backend):
    """masked_cast on the GPU: every kernel dtype pair the CUDA entry takes (and Triton's),
    bit for bit as torch's cast of where(M, W, 0), aligned (128-bit accesses) or not, [..., K];
    bf16 -> fp16 goes to the op body (no kernel)."""
    if backend == "triton":
        require_backend("triton")
    seen = record_backends(monkeypatch)
    floats = (torch.float32, torch.bfloat16, torch.float16)
    for src, dst in [(a, b) for a in floats for b in floats if torch.float32 in (a, b) or a == b]:
        for shape, shift in (((96, 200), 0), ((2, 48, 64), 0), ((33, 37), 0), ((40, 64), 1)):
            keep = torch.rand(shape, device="cuda") < 0.5
            base = (torch.randn(math.prod(shape) + 1, device="cuda") * 3e4).to(src)
            w = base[shift:shift + math.prod(shape)].view(shape)
            w[~keep] = float("nan")
            bits = pack_mask_reference(keep)
            with lass_sparse.use_backend(backend):
                got = lass_sparse.masked_cast(w, bits, dst)
            assert torch.equal(got, torch.where(keep, w, torch.zeros((), dtype=src,
                                                                         device="cuda")).to(dst))
    # the CUDA entry runs its kernel straight from the dispatcher (no registry); Triton is the
    # op body's choice under use_backend("triton")
    assert set(seen) == ({"triton"} if backend == "triton" else set())
    if backend == "cuda":
        seen.clear()
        w16 = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
        bits = pack_mask_reference(torch.rand(8, 64, device="cuda") < 0.5)
        got = torch.ops.lass_sparse.masked_cast(w16, bits, torch.float16)
        assert seen and "cuda" not in seen
        assert torch.equal(got, reference.masked_cast(w16, bits, torch.float16))


def test_autocast_training_step_runs_the_masked_cast_and_dense_kernels():
    """A masked layer under bf16 autocast with fp32 weights: masked_cast, then cuBLAS (no
    masked_linear call); output and fp32 weight grad as autocast's F.linear on W ⊙ M."""
    m = lass_sparse.MaskedLinear(256, 192).cuda()
    bank = lass_sparse.MaskBank({"weight": (192, 256)}, alpha=0.5)
    bank.add_pair("a", {"weight": torch.rand(192, 256) < 0.5})
    lass_sparse.attach(m, bank)
    x = torch.randn(128, 256, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with lass_sparse.active_pair(m, "a"), torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
            y.float().square().sum().backward()
    names = {e.name for e in prof.events()}
    assert "lass_sparse::masked_cast" in names and "lass_sparse::masked_linear" not in names
    keep = unpack_mask_reference(bank.bits("a", "weight").cuda(), 256)
    w = m.weight.detach().clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = torch.nn.functional.linear(x, torch.where(keep, w, 0.0), m.bias)
        want.float().square().sum().backward()
    assert torch.equal(y, want)
    torch.testing.assert_close(m.weight.grad, w.grad, rtol=0, atol=0)
