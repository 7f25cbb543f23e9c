"""Op contracts (DESIGN §3) for every CPU-side backend: values vs the reference, autograd,
opcheck, gradcheck, torch.compile and bad input. Triton has its own file (interpreter)."""

import itertools
import math

import pytest
import torch

import lass_sparse
from lass_sparse import reference
from lass_sparse.bitmask import pack_mask_reference, unpack_mask_reference
from lass_sparse.ops import registry

BACKENDS = [n for n in ("reference", "cpu") if lass_sparse.backends()[n]["active"]]
# + Triton where it serves this machine's tensors (the interpreter on CPU): through the public op.
ALL_BACKENDS = BACKENDS + [n for n in ("triton",) if lass_sparse.backends()[n]["active"]]


def _case(m_shape, n, k, dtype=torch.float32, p=0.5, bias=True, grad=False):
    x = torch.randn(*m_shape, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype)
    mask = torch.rand(n, k) < p
    b = torch.randn(n, dtype=dtype) if bias else None
    if grad:
        x.requires_grad_(True)
        w.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    return x, w, mask, pack_mask_reference(mask), b


SHAPES = [((1,), 7, 5), ((3,), 16, 32), ((4,), 9, 33), ((2, 5), 12, 70), ((17,), 40, 100),
          ((64,), 33, 257)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m_shape,n,k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear_fp32_matches_dense_of_masked_weight(backend, m_shape, n, k, bias):
    x, w, mask, bits, b = _case(m_shape, n, k, bias=bias, grad=True)
    with lass_sparse.use_backend(backend):
        y = lass_sparse.masked_linear(x, w, bits, b)
        gy = torch.randn_like(y)
        y.backward(gy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b2 = None if b is None else b.detach().clone().requires_grad_()
    y_ref = torch.nn.functional.linear(x2, w2 * mask, b2)
    y_ref.backward(gy)
    tol = 1e-5 * math.sqrt(k) * 4
    assert y.shape == (*m_shape, n)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=tol, rtol=1e-5)
    # dW = (dy^T x) ⊙ M: off-mask entries exactly zero
    assert torch.all(w.grad[~mask] == 0)
    torch.testing.assert_close(w.grad, w2.grad * mask, atol=tol, rtol=1e-5)
    if b is not None:
        torch.testing.assert_close(b.grad, b2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 16, 200])
def test_masked_linear_bf16_within_twice_torch_error(backend, m):
    n, k = 64, 300
    x, w, mask, bits, b = _case((m,), n, k, dtype=torch.bfloat16)
    exact = torch.nn.functional.linear(x.double(), (w * mask).double(), b.double())
    torch_err = (torch.nn.functional.linear(x, w * mask, b).double() - exact).abs().max()
    with lass_sparse.use_backend(backend):
        y = lass_sparse.masked_linear(x, w, bits, b)
    assert y.dtype == torch.bfloat16
    ours = (y.double() - exact).abs().max()
    assert ours <= 2 * torch_err + 1e-6, (float(ours), float(torch_err))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ones_and_all_zeros_masks(backend):
    x, w, _, _, b = _case((5,), 8, 40)
    ones = pack_mask_reference(torch.ones(8, 40, dtype=torch.bool))
    zeros = pack_mask_reference(torch.zeros(8, 40, dtype=torch.bool))
    with lass_sparse.use_backend(backend):
        torch.testing.assert_close(lass_sparse.masked_linear(x, w, ones, b),
                                   torch.nn.functional.linear(x, w, b))
        torch.testing.assert_close(lass_sparse.masked_linear(x, w, zeros, b), b.expand(5, 8))


# ------------------------------------------------------------------------------ magnitude mask


def _lass_rule(w, alpha):
    """The original LaSS code, verbatim in spirit."""
    kth = int(alpha * w.numel())
    if kth == 0:
        return torch.ones_like(w, dtype=torch.bool)
    thr = torch.kthvalue(w.abs().flatten(), kth).values
    return w.abs() > thr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.001, 0.3, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("shape", [(16, 40), (3, 1000), (1, 1), (33, 65)])
def test_magnitude_mask_matches_lass_rule(backend, alpha, shape):
    w = torch.randn(*shape)
    with lass_sparse.use_backend(backend):
        bits = lass_sparse.magnitude_mask(w, alpha)
    assert torch.equal(unpack_mask_reference(bits, shape[-1]), _lass_rule(w, alpha))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_magnitude_mask_ties_are_pruned(backend, dtype):
    # Many repeated magnitudes (and signs): every entry equal to the threshold is dropped.
    w = (torch.randint(-4, 5, (20, 50)).to(dtype)) / 4
    with lass_sparse.use_backend(backend):
        bits = lass_sparse.magnitude_mask(w, 0.5)
    keep = unpack_mask_reference(bits, 50)
    assert torch.equal(keep, _lass_rule(w.float(), 0.5))
    assert keep.sum() < 0.5 * w.numel()  # ties push the kept count below 1 - alpha


def test_magnitude_mask_alpha_zero_keeps_zeros_too():
    w = torch.zeros(4, 10)
    assert unpack_mask_reference(lass_sparse.magnitude_mask(w, 0.0), 10).all()


# ------------------------------------------------------------------------- opcheck / gradcheck


def _opcheck_samples():
    samples = []
    for m_shape, n, k in [((3,), 8, 33), ((2, 4), 5, 64), ((1,), 3, 7)]:
        for grad in (False, True):
            x, w, _, bits, b = _case(m_shape, n, k, grad=grad)
            samples.append(("masked_linear", (x, w, bits, b)))
            samples.append(("masked_linear", (x, w, bits, None)))
    x, w, mask, bits, _ = _case((6,), 8, 33)
    samples += [
        ("pack_mask", (mask,)),
        ("unpack_mask", (bits, 33)),
        ("magnitude_mask", (w, 0.5)),
        ("masked_cast", (w, bits, torch.bfloat16)),
        ("masked_cast", (w.clone().requires_grad_(), bits, torch.float16)),
        ("masked_linear_dx", (torch.randn(6, 8), w, bits)),
        ("masked_linear_dw", (torch.randn(6, 8), x, bits)),
        ("masked_linear_dw_accumulate_", (torch.zeros(8, 33), torch.randn(6, 8), x, bits)),
    ]
    bank = pack_mask_reference(torch.rand(3, 8, 33) > 0.5)
    offs, pair = torch.tensor([0, 2, 2, 6]), torch.tensor([2, 0, 1])
    for grad in (False, True):
        xs = torch.randn(6, 33, requires_grad=grad)
        ws = torch.randn(8, 33, requires_grad=grad)
        samples.append(("segmented_masked_linear", (xs, ws, bank, offs, pair, None)))
        xq = torch.randn(2, 3, 16, requires_grad=grad)
        wq = torch.randn(48, 16, requires_grad=grad)
        bq = pack_mask_reference(torch.rand(48, 16) > 0.5)
        samples.append(("masked_qkv_proj", (xq, wq, bq, torch.randn(48), 4)))
    ps = [torch.randn(4, 40), torch.randn(5)]
    samples.append(("masked_adamw_", (
        ps, [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
        [torch.zeros_like(p) for p in ps], [pack_mask_reference(torch.rand(4, 40) > 0.5), None],
        1e-3, 0.9, 0.999, 1e-8, 0.01, 1, False)))
    return samples


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_op(backend):
    seen = set()
    with lass_sparse.use_backend(backend):
        for name, args in _opcheck_samples():
            seen.add(name)
            torch.library.opcheck(getattr(torch.ops.lass_sparse, name).default, args)
    assert {"pack_mask", "unpack_mask", "magnitude_mask", "masked_cast", "masked_linear",
            "segmented_masked_linear", "masked_qkv_proj", "masked_adamw_"} <= seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x, w, _, bits, b = _case((3, 2), 6, 37, dtype=torch.float64, grad=True)
    with lass_sparse.use_backend(backend):
        assert torch.autograd.gradcheck(lass_sparse.masked_linear, (x, w, bits, b))
        bank = pack_mask_reference(torch.rand(2, 6, 37) > 0.5)
        offs, pair = torch.tensor([0, 1, 4, 6]), torch.tensor([1, 0, 1])
        xs = torch.randn(6, 37, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda a, c: lass_sparse.segmented_masked_linear(a, c, bank, offs, pair), (xs, w))
        xq = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
        wq = torch.randn(24, 8, dtype=torch.float64, requires_grad=True)
        bq = pack_mask_reference(torch.rand(24, 8) > 0.5)
        assert torch.autograd.gradcheck(
            lambda a, c: lass_sparse.masked_qkv_proj(a, c, bq, None, 2), (xq, wq))
        assert torch.autograd.gradcheck(lambda c: lass_sparse.masked_cast(c, bits), (w,))
        assert torch.autograd.gradgradcheck(lambda c: lass_sparse.masked_cast(c, bits), (w,))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_masked_cast_is_the_masked_weight_cast(backend):
    """(W ⊙ M).to(dtype) for every float pair, [..., K] weights, odd K, zero sizes: equal to
    torch's cast of the selected weight (NaN/Inf off the mask never passes; fp16 overflow is
    Inf as torch's cast). Triton's interpreter rounds fp32 -> bf16 toward zero (compiled Triton
    rounds to nearest even, as the GPU test checks): there, within one bf16 step."""
    floats = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    for src, dst in itertools.product(floats, floats):
        if backend == "triton" and torch.float64 in (src, dst):
            continue  # the Triton kernels take 16/32-bit floats
        for shape in ((8, 33), (2, 3, 64), (0, 5), (4, 0), (1, 1)):
            keep = torch.rand(shape) < 0.5
            w = (torch.randn(shape) * 3e4).to(src)
            w[~keep & (torch.rand(shape) < 0.5)] = float("nan")
            bits = pack_mask_reference(keep)
            with lass_sparse.use_backend(backend):
                got = lass_sparse.masked_cast(w, bits, dst)
            want = torch.where(keep, w, torch.zeros((), dtype=src)).to(dst)
            assert got.dtype == dst and got.shape == w.shape
            if backend == "triton" and dst == torch.bfloat16 and src != dst:
                torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0, equal_nan=False)
            else:
                assert torch.equal(got, want), (src, dst, shape)
    w = torch.randn(6, 40, requires_grad=True)
    bits = pack_mask_reference(torch.rand(6, 40) < 0.5)
    with lass_sparse.use_backend(backend):
        y = lass_sparse.masked_cast(w, bits, torch.bfloat16)
        (y.float() * torch.arange(240.).view(6, 40)).sum().backward()
    keep = lass_sparse.unpack_mask(bits, 40)
    assert w.grad.dtype == torch.float32
    assert torch.equal(w.grad, torch.where(keep, torch.arange(240.).view(6, 40).bfloat16().float(),
                                           torch.zeros(())))


def test_compile_fullgraph_equals_eager():
    x, w, _, bits, b = _case((4, 3), 16, 40)

    def f(x, w, bits, b):
        return torch.nn.functional.gelu(lass_sparse.masked_linear(x, w, bits, b)) * 2

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, w, bits, b), f(x, w, bits, b))


def _grads(fn, *ts):
    out = fn(*ts)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().pow(2).sum() for o in outs).backward()
    res = [o.detach().clone() for o in outs] + [t.grad.clone() for t in ts if t is not None
                                                 and t.requires_grad]
    for t in ts:
        if t is not None:
            t.grad = None
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_direct_path_equals_the_op_path(dtype):
    """The public functions call the op bodies directly in plain eager; results and gradients
    are bit-identical to going through torch.ops (which compile, opcheck and modes take)."""
    x, w, _, bits, b = _case((2, 3), 24, 40, dtype=dtype, grad=True)
    ls_ops = lass_sparse.ops
    for public, op, args in (
            (ls_ops.masked_linear, torch.ops.lass_sparse.masked_linear, (x, w, bits, b)),
            (lambda *a: ls_ops.masked_qkv_proj(*a, 2),
             lambda *a: torch.ops.lass_sparse.masked_qkv_proj(*a, 2),
             (torch.randn(2, 3, 8, dtype=dtype, requires_grad=True),
              torch.randn(24, 8, dtype=dtype, requires_grad=True), bits[:, :1].contiguous(),
              torch.randn(24, dtype=dtype, requires_grad=True))),
            (ls_ops.segmented_masked_linear, torch.ops.lass_sparse.segmented_masked_linear,
             (x.detach().reshape(6, 40).requires_grad_(), w,
              pack_mask_reference(torch.rand(3, 24, 40) > 0.5), torch.tensor([0, 2, 2, 6]),
              torch.tensor([2, 0, 1]), b))):
        for a, e in zip(_grads(public, *args), _grads(op, *args)):
            assert torch.equal(a, e)
    assert type(ls_ops.segmented_masked_linear(*args).grad_fn).__name__ == "_SegmentedFnBackward"
    with torch.no_grad():  # the no-grad direct path
        assert torch.equal(ls_ops.masked_linear(x, w, bits, b),
                           torch.ops.lass_sparse.masked_linear(x, w, bits, b))
        assert torch.equal(ls_ops.segmented_masked_linear(*args),
                           torch.ops.lass_sparse.segmented_masked_linear(*args))


def test_eager_direct_path_is_taken_only_in_plain_eager(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []
    # the direct path: the op body, or on CPU / CUDA the op's native kernel (the C++ entry)
    # below autograd
    eager = lass_sparse.ops.eager
    fn = eager.masked_linear_body
    monkeypatch.setattr(eager, "masked_linear_body", lambda *a: calls.append(1) or fn(*a))
    monkeypatch.setattr(eager, "ML_NATIVE", {
        dev: (lambda *a, fn=fn: calls.append(1) or fn(*a)) for dev, fn in eager.ML_NATIVE.items()})
    x, w, _, bits, b = _case((3,), 16, 40)
    lass_sparse.masked_linear(x, w, bits, b)
    assert calls == [1], "plain eager call did not take the direct path"
    with torch.inference_mode():  # there the op call skips autograd itself, and costs less
        y = lass_sparse.masked_linear(x, w, bits, b)
    assert calls == [1] and torch.equal(y, torch.ops.lass_sparse.masked_linear(x, w, bits, b))

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        lass_sparse.masked_linear(x, w, bits, b)
    assert calls == [1] and any("lass_sparse.masked_linear" in s for s in seen), seen
    with FakeTensorMode() as mode:
        y = lass_sparse.masked_linear(mode.from_tensor(x), mode.from_tensor(w),
                                      mode.from_tensor(bits), mode.from_tensor(b))
    assert calls == [1] and list(y.shape) == [3, 16]
    with pytest.raises(ValueError, match="x must be"):  # same checks on the direct path
        lass_sparse.masked_linear(x[:, :7], w, bits, b)


@pytest.mark.parametrize("path", ["public", "op"])
def test_in_place_on_the_output_works_under_autograd(path):
    """As after F.linear: ``y.relu_()`` on a [B, T, N] output, gradients as the dense way."""
    x, w, mask, bits, b = _case((2, 3), 8, 20, grad=True)
    fn = lass_sparse.masked_linear if path == "public" else torch.ops.lass_sparse.masked_linear
    y = fn(x, w, bits, b)
    y.add_(1.0).relu_().sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    torch.nn.functional.linear(x2, w2 * mask, b2).add_(1.0).relu_().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad * mask)
    torch.testing.assert_close(b.grad, b2.grad)


def _node_names(y):
    names, todo = [], [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None:
            names.append(type(fn).__name__ if not hasattr(fn, "name") else fn.name())
            todo += [f for f, _ in fn.next_functions]
    return names


@pytest.mark.skipif(not lass_sparse.backends()["cpu"]["active"], reason="needs the C++ backend")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m_shape", [(2, 3), (80,)])  # CUDA: the decode kernel; the Triton body
def test_training_calls_take_the_cpp_autograd_node(device, dtype, m_shape):
    """Eager calls that need a gradient run forward and backward as one C++ autograd node
    (csrc/cpu/autograd.cpp; its products through the dispatcher: the CPU/CUDA kernels, or the
    op body for calls they do not take, e.g. float16 on the CPU), bit-identical to the Python
    node (which a forced backend takes); bad input and double backward as on the op path."""
    x, w, _, bits, b = (t.to(device) if t is not None else t
                        for t in _case(m_shape, 24, 40, dtype=dtype))
    for t in (x, w, b):
        t.requires_grad_(True)
    y = lass_sparse.masked_linear(x, w, bits, b)
    names = _node_names(y)
    assert any("MaskedLinearFn" in n and "Cpp" in n for n in names), names
    assert not any(n.startswith("_MaskedLinearFn") for n in names), names
    got = _grads(lambda *ts: lass_sparse.masked_linear(ts[0], ts[1], bits, ts[2]), x, w, b)
    forced = registry.select("masked_linear", device, x, w, bits, b, forced=None).backend
    with lass_sparse.use_backend(forced):  # the same kernels behind the Python node
        names = _node_names(lass_sparse.masked_linear(x, w, bits, b))
        want = _grads(lambda *ts: lass_sparse.masked_linear(ts[0], ts[1], bits, ts[2]), x, w, b)
    assert any(n.startswith("_MaskedLinearFn") for n in names), names
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    with pytest.raises(ValueError, match="masked_linear: bits"):
        lass_sparse.masked_linear(x, w, bits[:, :1].contiguous(), b)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.float().sum(), w, create_graph=True)


@pytest.mark.skipif(not lass_sparse.backends()["cpu"]["active"], reason="needs the C++ backend")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("src, dst", [(torch.float32, torch.bfloat16),
                                      (torch.float32, torch.float16),
                                      (torch.bfloat16, torch.float32),
                                      (torch.float64, torch.float32)])
def test_masked_cast_training_calls_take_the_cpp_autograd_node(device, src, dst):
    """masked_cast with a gradient runs as one C++ autograd node, its backward the op with the
    weight's dtype: bit-identical to the Python node (which a forced backend takes); double
    backward runs through the op itself; bad input is worded by the op's checks."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g).to(device, src).requires_grad_()
    bits = pack_mask_reference(torch.rand(24, 40, generator=g) > 0.5).to(device)
    up = torch.randn(24, 40, generator=g).to(device, dst)

    def run():
        y = lass_sparse.masked_cast(w, bits, dst)
        names = _node_names(y)
        (y * up).sum().backward()
        out = (y.detach(), w.grad)
        w.grad = None
        return names, out

    names, got = run()
    assert any("MaskedCastFn" in n and "Cpp" in n for n in names), names
    forced = registry.select("masked_cast", device, w, bits, dst, forced=None).backend
    with lass_sparse.use_backend(forced):
        names, want = run()
    assert any(n.startswith("_MaskedCastFn") for n in names), names
    assert all(torch.equal(a, e) for a, e in zip(got, want))
    assert got[1].dtype == src
    (gw,) = torch.autograd.grad((lass_sparse.masked_cast(w, bits, dst) * up).sum(), w,
                                create_graph=True)  # the backward through the op itself
    assert torch.equal(gw, got[1])
    w64 = torch.randn(6, 40, dtype=torch.float64, device=device, requires_grad=True)
    bits6 = bits[:6].contiguous()
    assert torch.autograd.gradgradcheck(lambda a: lass_sparse.masked_cast(a, bits6), (w64,))
    with pytest.raises(ValueError, match="masked_cast: bits"):
        lass_sparse.masked_cast(w, bits[:, :1].contiguous(), dst)


@pytest.mark.skipif(not lass_sparse.backends()["cpu"]["active"], reason="needs the C++ backend")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [3, 48])  # CUDA: the op body (Triton); the cuBLAS route entry
def test_qkv_training_calls_take_the_cpp_autograd_node(device, dtype, t):
    """masked_qkv_proj with gradients runs as one C++ autograd node (csrc/cpu/autograd.cpp),
    bit-identical to the Python node (which a forced backend takes) in q, k, v and every grad,
    with a bias or without, one output unused; bad input and double backward as on the op."""
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, t, 64, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(192, 64, generator=g).to(device, dtype).requires_grad_()
    bits = pack_mask_reference(torch.rand(192, 64, generator=g) > 0.5).to(device)

    def run(b):
        leaves = [leaf for leaf in (x, w, b) if leaf is not None]
        q, k, v = lass_sparse.masked_qkv_proj(x, w, bits, b, 4)
        names = _node_names(q)
        (q.float().square().sum() + 3 * v.float().sum()).backward()  # k unused
        out = [q.detach(), k.detach(), v.detach()] + [leaf.grad for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        return names, out

    for b in (torch.randn(192, generator=g).to(device, dtype).requires_grad_(), None):
        names, got = run(b)
        assert any("MaskedQKVFn" in n and "Cpp" in n for n in names), names
        forced = registry.select("masked_qkv_proj", device, x, w, bits, b, 4, forced=None)
        with lass_sparse.use_backend(forced.backend):
            names, want = run(b)
        assert any(n.startswith("_MaskedQKVFn") for n in names), names
        for a, e in zip(got, want):
            assert torch.equal(a, e)
    with pytest.raises(ValueError, match="masked_qkv_proj: num_heads"):
        lass_sparse.masked_qkv_proj(x, w, bits, None, 5)
    q = lass_sparse.masked_qkv_proj(x, w, bits, None, 4)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(q.float().sum(), w, create_graph=True)


def test_eager_direct_adamw_equals_the_op_path():
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(8, 40, generator=g), torch.randn(5, generator=g)]
    gs = [torch.randn_like(p) for p in ps]
    bits = [pack_mask_reference(torch.rand(8, 40, generator=g) < 0.5), None]
    runs = []
    for fn in (lass_sparse.masked_adamw_, None):
        p2 = [p.clone() for p in ps]
        m2 = [torch.zeros_like(p) for p in ps]
        v2 = [torch.zeros_like(p) for p in ps]
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=3,
                  maximize=False)
        with torch.no_grad():
            if fn is not None:
                fn(p2, gs, m2, v2, bits, **kw)
            else:
                torch.ops.lass_sparse.masked_adamw_(p2, gs, m2, v2, bits, *kw.values())
        runs.append(p2 + m2 + v2)
    for a, e in zip(*runs):
        assert torch.equal(a, e)


# ---------------------------------------------------------------------------- segmented / qkv


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_segmented_matches_per_segment_masked_linear(backend):
    t, n, k, p = 10, 12, 45, 4
    x, w = torch.randn(t, k), torch.randn(n, k)
    masks = torch.rand(p, n, k) > 0.5
    bank = pack_mask_reference(masks)
    offs, pair = torch.tensor([0, 3, 3, 7, 10]), torch.tensor([3, 1, 0, 3])
    with lass_sparse.use_backend(backend):
        y = lass_sparse.segmented_masked_linear(x, w, bank, offs, pair)
    for lo, hi, q in [(0, 3, 3), (3, 7, 0), (7, 10, 3)]:
        torch.testing.assert_close(y[lo:hi], x[lo:hi] @ (w * masks[q]).T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_qkv_proj_layout(backend):
    bsz, t, d, h = 2, 5, 32, 4
    x, w, b = torch.randn(bsz, t, d), torch.randn(3 * d, d), torch.randn(3 * d)
    mask = torch.rand(3 * d, d) > 0.5
    with lass_sparse.use_backend(backend):
        q, k, v = lass_sparse.masked_qkv_proj(x, w, pack_mask_reference(mask), b, h)
    # three separate buffers: torch.library refuses outputs that alias each other
    assert len({t.untyped_storage().data_ptr() for t in (q, k, v)}) == 3
    y = torch.nn.functional.linear(x, w * mask, b)
    for i, out in enumerate((q, k, v)):
        want = y[..., i * d:(i + 1) * d].reshape(bsz, t, h, d // h).transpose(1, 2)
        assert out.shape == (bsz, h, t, d // h)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_reference_adamw_off_mask_untouched_and_on_mask_matches_torch():
    p0 = torch.randn(6, 40)
    mask = torch.rand(6, 40) > 0.5
    bits = pack_mask_reference(mask)
    p, m, v = p0.clone(), torch.zeros(6, 40), torch.zeros(6, 40)
    ref = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for step in range(1, 6):
        g = torch.randn(6, 40)
        reference.masked_adamw_([p], [g], [m], [v], [bits], 1e-2, 0.9, 0.999, 1e-8, 0.1, step,
                                False)
        ref.grad = g * mask
        opt.step()
    assert torch.equal(p[~mask], p0[~mask]) and torch.all(m[~mask] == 0)
    torch.testing.assert_close(p[mask], ref.detach()[mask], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ bad input


def test_bad_input_errors_name_the_argument():
    x, w, _, bits, b = _case((3,), 8, 40)
    with pytest.raises(ValueError, match=r"bits must be int32\[8, 2\]"):
        lass_sparse.masked_linear(x, w, bits[:, :1], b)
    with pytest.raises(ValueError, match="bits must be int32"):
        lass_sparse.masked_linear(x, w, bits.long(), b)
    with pytest.raises(TypeError, match="x and weight must share a dtype"):
        lass_sparse.masked_linear(x.double(), w, bits, b)
    with pytest.raises(ValueError, match=r"x must be \[..., K=40\]"):
        lass_sparse.masked_linear(x[:, :39], w, bits, b)
    with pytest.raises(ValueError, match="bias must be"):
        lass_sparse.masked_linear(x, w, bits, b[:3])
    with pytest.raises(ValueError, match="alpha must be in"):
        lass_sparse.magnitude_mask(w, 1.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        lass_sparse.magnitude_mask(w, -0.1)
    with pytest.raises(TypeError, match="x must be float32"):
        lass_sparse.masked_linear(x.long(), w, bits, b)
    bank = bits.unsqueeze(0).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="non-decreasing"):
        lass_sparse.segmented_masked_linear(x, w, bank, torch.tensor([0, 2, 1, 3]),
                                            torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"seg_pair ids must be in \[0, P=2\)"):
        lass_sparse.segmented_masked_linear(x, w, bank, torch.tensor([0, 3]), torch.tensor([2]))
    with pytest.raises(ValueError, match="num_heads must divide"):
        lass_sparse.masked_qkv_proj(torch.randn(1, 2, 8), torch.randn(24, 8),
                                    pack_mask_reference(torch.ones(24, 8, dtype=torch.bool)),
                                    None, 3)


def test_different_devices_are_rejected():
    x, w, _, bits, b = _case((3,), 8, 40)
    with pytest.raises(ValueError, match="one device"):
        lass_sparse.masked_linear(x, w, bits.to("meta"), b)


def test_flop_counter_counts_the_masked_matmuls_as_dense_ones():
    """FlopCounterMode sees our ops (registered formulas): a masked linear's forward and
    backward count 2·M·N·K each pass, as aten.mm's do; segmented and QKV alike."""
    from torch.utils.flop_counter import FlopCounterMode

    m, n, k = 6, 24, 40
    x = torch.randn(2, 3, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    bits = lass_sparse.pack_mask(torch.rand(n, k) < 0.5)
    with FlopCounterMode(display=False) as fc:
        lass_sparse.masked_linear(x, w, bits).sum().backward()
    assert fc.get_total_flops() == 3 * 2 * m * n * k
    bank = torch.stack([bits, lass_sparse.pack_mask(torch.rand(n, k) < 0.5)])
    xs = torch.randn(m, k, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        lass_sparse.segmented_masked_linear(xs, w, bank, torch.tensor([0, 2, m]),
                                   torch.tensor([1, 0])).sum().backward()
    assert fc.get_total_flops() == 3 * 2 * m * n * k
    d = 8
    wq = torch.randn(3 * d, d)
    bq = lass_sparse.pack_mask(torch.rand(3 * d, d) < 0.5)
    with FlopCounterMode(display=False) as fc:
        lass_sparse.masked_qkv_proj(torch.randn(2, 3, d), wq, bq, None, 2)
    assert fc.get_total_flops() == 2 * 6 * 3 * d * d
