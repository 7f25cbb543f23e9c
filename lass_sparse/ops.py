"""Op schemas, input checks, fake kernels, autograd and dispatch (DESIGN §3).

Every op is a ``torch.library`` custom op in namespace ``lass_sparse`` with a fake kernel (so
``torch.compile(fullgraph=True)`` traces it) and, where differentiable, autograd registered once
for all backends. The op body checks its inputs, normalises them (2-D, contiguous) and hands
them to the backend chosen by :mod:`lass_sparse._registry`. The fake kernels run the same checks
(dtype, shape, one device), so a meta tensor among real ones is an error naming the argument,
never an uninitialised result; checks that read values (segment offsets, pair ids, aliasing of
optimizer state) run in the op body only.

Native kernels: the C++ CPU and CUDA kernels register under these ops' names
(``TORCH_LIBRARY_IMPL(lass_sparse, CPU / CUDA)``, csrc/common/entry.h); they defer to the op body
through ``<op>.registry`` (the op's schema, read from the op) when another backend is forced or
a call is not theirs (inputs they refuse; on CUDA, more rows than the decode GEMV takes).

Eager calls: in plain eager (no compile or trace, no dispatch mode, no functorch transform),
``masked_linear``, ``masked_qkv_proj``, their backward ops and ``masked_adamw_`` (under no_grad)
run the op body (on CPU and CUDA tensors: the op's native kernel, below autograd) directly, with an
equivalent ``autograd.Function`` when a gradient is needed, skipping the custom-op wrapper layers:
the same checks and kernels, bit-identical results, less per-call host overhead. Everything
else goes through ``torch.ops.lass_sparse``.

Shapes: ``x: [..., K]``, ``weight: [N, K]`` (``nn.Linear`` layout), ``bits: int32[N, ceil(K/32)]``;
any of M, N, K may be 0 (results as ``F.linear``).

Non-finite values: a masked-out weight is *not used* (a select, never ``W * M``), so NaN/Inf
stored off the mask never reaches y, dx or dW, and off-mask dW is exactly 0 whatever x and
grad_out hold. Non-finite x, grad_out, bias or on-mask weights propagate as in
``F.linear(x, where(M, W, 0), b)``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _registry
from . import reference as _reference  # noqa: F401  (registers the oracle kernels)
from .bitmask import check_bits, check_same_device, num_words

NS = "lass_sparse"
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dispatch(op: str, device: torch.device, *args):
    return _registry.dispatch(op, device, *args)


def _is_tensors(*ts) -> bool:
    return all(isinstance(t, Tensor) for t in ts)


def _checked(op: str, device: torch.device, check, *tensors: Tensor):
    """Dispatch ``op`` on contiguous ``tensors`` with ``check`` (raising) as its input checks:
    run first unless the kernel validates (``_registry.dispatch_checked``)."""
    if not _is_tensors(*tensors):
        check()
    return _registry.dispatch_checked(op, device, check, *(t.contiguous() for t in tensors))


_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(*ts: Tensor | None) -> bool:
    """True for a plain eager call: no compile or trace, no dispatch mode (fake, functional,
    FlopCounter, ...), no functorch transform, and plain, non-meta tensors. The public functions
    then run the op body (and, for gradients, an equivalent ``autograd.Function``) directly,
    skipping the custom-op wrapper layers; every other call goes through ``torch.ops``. Both
    paths run the same checks and kernels."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active()):
        return False
    return all(t is None or (type(t) in _PLAIN and not t.is_meta) for t in ts)


def _native_kernel(op: str, key: str = "CPU"):
    """``op``'s kernel for dispatch key ``key`` (``CPU``, ``CUDA``), called below autograd: the
    C++ entry where that extension is built (it defers to the op body under a forced backend or
    for inputs it does not take), else the op body. The direct path for plain eager calls."""
    handle = getattr(torch.ops.lass_sparse, op).default
    keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    return lambda *args: handle.redispatch(keys, *args)


def _profiled(op: str, fn, *args):
    """``fn(*args)`` under a ``lass_sparse::op`` profiler range when a profiler is on (the
    direct path has no dispatcher entry of its own to show)."""
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(f"{NS}::{op}"):
            return fn(*args)
    return fn(*args)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _desc(t: Tensor) -> str:
    return f"{_dt(t.dtype)}{list(t.shape)}"


def _check_float(op: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32, float64, bfloat16 or float16, got {_desc(t)}"
        )


def _check_linear(op: str, x: Tensor, weight: Tensor, bits: Tensor | None,
                  bias: Tensor | None) -> None:
    """x [..., K], weight [N, K], bits int32[N, ceil(K/32)] (None: checked by the caller), bias
    [N]: dtypes, shapes, and one device for all of them."""
    _check_float(op, "x", x)
    _check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [N, K], got {_desc(weight)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must be [..., K={k}] to match weight [N, K], got {_desc(x)}")
    if x.dtype != weight.dtype:
        raise TypeError(
            f"{op}: x and weight must share a dtype, got x {x.dtype} and weight {weight.dtype}"
        )
    if bits is not None:
        check_bits(bits, (n,), k, op)
    if bias is not None:
        _check_float(op, "bias", bias)
        if list(bias.shape) != [n] or bias.dtype != weight.dtype:
            raise ValueError(f"{op}: bias must be {_dt(weight.dtype)}[{n}], got {_desc(bias)}")
    check_same_device(op, x=x, weight=weight, bits=bits, bias=bias)


# --------------------------------------------------------------------------------- pack / unpack


def _pack_mask_body(mask: Tensor) -> Tensor:
    if mask.dtype != torch.bool or mask.dim() < 1:
        raise TypeError(f"pack_mask: mask must be bool[..., K], got {_desc(mask)}")
    return _dispatch("pack_mask", mask.device, mask.contiguous())


_pack_mask = torch.library.custom_op(f"{NS}::pack_mask", _pack_mask_body, mutates_args=())


@_pack_mask.register_fake
def _(mask):
    return mask.new_empty((*mask.shape[:-1], num_words(mask.shape[-1])), dtype=torch.int32)


def _unpack_mask_body(bits: Tensor, k: int) -> Tensor:
    _check_unpack(bits, k)
    return _dispatch("unpack_mask", bits.device, bits.contiguous(), k)


_unpack_mask = torch.library.custom_op(f"{NS}::unpack_mask", _unpack_mask_body,
                                       mutates_args=())


def _check_unpack(bits: Tensor, k: int) -> None:
    if k < 0:
        raise ValueError(f"unpack_mask: k must be >= 0, got {k}")
    if bits.dtype != torch.int32 or bits.dim() < 1 or bits.shape[-1] != num_words(k):
        raise ValueError(
            f"unpack_mask: bits must be int32[..., ceil(k/32)={num_words(k)}] for k={k}, "
            f"got {_desc(bits)}"
        )


@_unpack_mask.register_fake
def _(bits, k):
    _check_unpack(bits, k)
    return bits.new_empty((*bits.shape[:-1], k), dtype=torch.bool)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack ``mask: bool[..., K]`` into ``int32[..., ceil(K/32)]`` (LSB first, zero padding)."""
    return torch.ops.lass_sparse.pack_mask(mask)


def unpack_mask(bits: Tensor, k: int) -> Tensor:
    """Unpack ``bits: int32[..., ceil(k/32)]`` into ``bool[..., k]``."""
    return torch.ops.lass_sparse.unpack_mask(bits, k)


# -------------------------------------------------------------------------------- magnitude mask


def _magnitude_mask_body(weight: Tensor, alpha: float) -> Tensor:
    _check_float("magnitude_mask", "weight", weight)
    if weight.dim() < 1:
        raise ValueError(f"magnitude_mask: weight must have at least 1 dim, got {_desc(weight)}")
    if not (0.0 <= alpha < 1.0):
        raise ValueError(f"magnitude_mask: alpha must be in [0, 1), got {alpha}")
    return _dispatch("magnitude_mask", weight.device, weight.contiguous(), float(alpha))


_magnitude_mask = torch.library.custom_op(f"{NS}::magnitude_mask", _magnitude_mask_body,
                                          mutates_args=())


@_magnitude_mask.register_fake
def _(weight, alpha):
    return weight.new_empty((*weight.shape[:-1], num_words(weight.shape[-1])), dtype=torch.int32)


def magnitude_mask(weight: Tensor, alpha: float) -> Tensor:
    """LaSS pruning rule: keep ``|w| > kthvalue(|w|.flatten(), int(alpha * numel))``.

    Returns packed bits ``int32[..., ceil(K/32)]`` for ``weight: [..., K]``. ``alpha`` is the
    fraction pruned, in ``[0, 1)``; when ``int(alpha * numel) == 0`` every entry is kept (zeros
    too). Ties: every entry equal to the threshold is pruned, so with repeated magnitudes more
    than ``int(alpha * numel)`` entries may be dropped — exactly as the original LaSS code.
    """
    return torch.ops.lass_sparse.magnitude_mask(weight, alpha)


# --------------------------------------------------------------------------------- masked linear


def _masked_linear_body(x: Tensor, weight: Tensor, bits: Tensor, bias: Tensor | None) -> Tensor:
    def check() -> None:
        _check_linear("masked_linear", x, weight, bits, bias)

    if not (_is_tensors(x, weight, bits) and weight.dim() == 2 and x.dim() >= 1
            and x.shape[-1] == weight.shape[1]):
        check()  # raises: the reshape below needs these
    n, k = weight.shape
    flat = x.dim() == 2
    x2 = (x if flat else x.reshape(math.prod(x.shape[:-1]), k)).contiguous()  # K may be 0
    b = None if bias is None else bias.contiguous()
    y = _registry.dispatch_checked("masked_linear", x.device, check, x2, weight.contiguous(),
                                   bits.contiguous(), b)
    # detach: a plain tensor, not a view of the 2-D result, so in-place ops on the output
    # (``F.relu(..., inplace=True)``) work under autograd as after ``F.linear``
    return y if flat else y.reshape(*x.shape[:-1], n).detach()


_masked_linear = torch.library.custom_op(f"{NS}::masked_linear", _masked_linear_body,
                                         mutates_args=())


@_masked_linear.register_fake
def _(x, weight, bits, bias):
    _check_linear("masked_linear", x, weight, bits, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _masked_linear_dx_body(grad_out: Tensor, weight: Tensor, bits: Tensor) -> Tensor:
    """``dx[M, K] = grad_out[M, N] @ (W ⊙ M)``."""
    return _checked("masked_linear_dx", grad_out.device,
                    lambda: _check_dx("masked_linear_dx", grad_out, weight, bits),
                    grad_out, weight, bits)


_masked_linear_dx = torch.library.custom_op(f"{NS}::masked_linear_dx", _masked_linear_dx_body,
                                            mutates_args=())


def _check_dx(op: str, grad_out: Tensor, weight: Tensor, bits: Tensor, bank: bool = False):
    _check_float(op, "grad_out", grad_out)
    _check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [N, K], got {_desc(weight)}")
    n, k = weight.shape
    if grad_out.dim() != 2 or grad_out.shape[1] != n:
        raise ValueError(f"{op}: grad_out must be [M, N={n}], got {_desc(grad_out)}")
    if grad_out.dtype != weight.dtype:
        raise TypeError(f"{op}: grad_out and weight must share a dtype, got {grad_out.dtype} and "
                        f"{weight.dtype}")
    if bank:
        _check_bank(op, bits, n, k)
    else:
        check_bits(bits, (n,), k, op)
    check_same_device(op, grad_out=grad_out, weight=weight, bits=bits)


@_masked_linear_dx.register_fake
def _(grad_out, weight, bits):
    _check_dx("masked_linear_dx", grad_out, weight, bits)
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1]))


def _check_dw(op: str, grad_out: Tensor, x: Tensor, bits: Tensor, bank: bool = False) -> None:
    _check_float(op, "grad_out", grad_out)
    _check_float(op, "x", x)
    if grad_out.dim() != 2 or x.dim() != 2 or grad_out.shape[0] != x.shape[0]:
        raise ValueError(
            f"{op}: grad_out must be [M, N] and x [M, K] with the same M, got "
            f"{_desc(grad_out)} and {_desc(x)}"
        )
    if grad_out.dtype != x.dtype:
        raise TypeError(f"{op}: grad_out and x must share a dtype, got {grad_out.dtype}, {x.dtype}")
    if bank:
        _check_bank(op, bits, grad_out.shape[1], x.shape[1])
    else:
        check_bits(bits, (grad_out.shape[1],), x.shape[1], op)
    check_same_device(op, grad_out=grad_out, x=x, bits=bits)


def _masked_linear_dw_body(grad_out: Tensor, x: Tensor, bits: Tensor) -> Tensor:
    """``dW[N, K] = (grad_out[M, N]ᵀ @ x[M, K]) ⊙ M``; off-mask entries are exactly 0."""
    return _checked("masked_linear_dw", x.device,
                    lambda: _check_dw("masked_linear_dw", grad_out, x, bits), grad_out, x, bits)


_masked_linear_dw = torch.library.custom_op(f"{NS}::masked_linear_dw", _masked_linear_dw_body,
                                            mutates_args=())


@_masked_linear_dw.register_fake
def _(grad_out, x, bits):
    _check_dw("masked_linear_dw", grad_out, x, bits)
    return x.new_empty((grad_out.shape[1], x.shape[1]))


def _dw_accumulate_body(grad: Tensor, grad_out: Tensor, x: Tensor, bits: Tensor) -> None:
    """``grad[N, K] += (grad_out ᵀ @ x) ⊙ M`` (grad fp32 or x's dtype), for micro-batches;
    off-mask entries of ``grad`` are left as they are."""
    _check_accumulate(grad, grad_out, x, bits)
    _dispatch(
        "masked_linear_dw_accumulate_", x.device, grad, grad_out.contiguous(), x.contiguous(),
        bits.contiguous(),
    )


_masked_linear_dw_accumulate_ = torch.library.custom_op(
    f"{NS}::masked_linear_dw_accumulate_", _dw_accumulate_body, mutates_args=("grad",))


def _check_accumulate(grad, grad_out, x, bits) -> None:
    op = "masked_linear_dw_accumulate_"
    _check_dw(op, grad_out, x, bits)
    _check_float(op, "grad", grad)
    want = [grad_out.shape[1], x.shape[1]]
    if list(grad.shape) != want or grad.dtype not in (torch.float32, x.dtype):
        alt = "" if x.dtype == torch.float32 else f" or {_dt(x.dtype)}{want}"
        raise ValueError(f"{op}: grad must be float32{want}{alt}, got {_desc(grad)}")
    if not grad.is_contiguous():
        raise ValueError(f"{op}: grad must be contiguous")
    check_same_device(op, x=x, grad=grad)


@_masked_linear_dw_accumulate_.register_fake
def _(grad, grad_out, x, bits):
    _check_accumulate(grad, grad_out, x, bits)
    return None


def _grad_op(op: str, body, *args: Tensor) -> Tensor:
    """A backward pass's dx or dW: ``body`` directly in a plain eager backward (no graph built
    for double backward), else through ``torch.ops.lass_sparse.<op>``."""
    if not torch.is_grad_enabled() and _eager(*args):
        return _profiled(op, _GRAD_CPU[op] if args[0].is_cpu else body, *args)
    return getattr(torch.ops.lass_sparse, op)(*args)


def _dx(dy: Tensor, weight: Tensor, bits: Tensor) -> Tensor:
    return _grad_op("masked_linear_dx", _masked_linear_dx_body, dy, weight, bits)


def _dw(dy: Tensor, x: Tensor, bits: Tensor) -> Tensor:
    return _grad_op("masked_linear_dw", _masked_linear_dw_body, dy, x, bits)


def _ml_setup(ctx, inputs, output):
    x, weight, bits, bias = inputs
    ctx.save_for_backward(x, weight, bits)
    ctx.has_bias = bias is not None


def _ml_backward(ctx, grad):
    x, weight, bits = ctx.saved_tensors
    n, k = weight.shape
    m = math.prod(x.shape[:-1])
    dy = grad.reshape(m, n)  # explicit sizes: N or K may be 0
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = _dx(dy, weight, bits).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        dw = _dw(dy, x.reshape(m, k), bits)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = dy.sum(0)
    return dx, dw, None, db


_masked_linear.register_autograd(_ml_backward, setup_context=_ml_setup)


class _MaskedLinearFn(torch.autograd.Function):
    """The eager twin of the op's registered autograd: same body, same backward."""

    @staticmethod
    def forward(ctx, x, weight, bits, bias):  # ctx-style: no per-call signature binding
        y = _masked_linear_body(x, weight, bits, bias)
        _ml_setup(ctx, (x, weight, bits, bias), y)
        return y

    backward = staticmethod(_ml_backward)


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


@functools.cache
def _cpu_train_op():
    """``lass_sparse_cpu::masked_linear_autograd`` where the C++ backend is active, else None."""
    if not _registry.status()["cpu"].active:
        return None
    return getattr(torch.ops.lass_sparse_cpu, "masked_linear_autograd", None)


def _cpu_autograd(x: Tensor, weight: Tensor, bits: Tensor, bias: Tensor | None):
    """masked_linear with its gradient in C++ (``lass_sparse_cpu::masked_linear_autograd``: one
    C++ autograd node, the same kernels) for an eager CPU call that the C++ backend serves
    unforced; None when another path must take it. Errors are worded by the op's checks."""
    op = _cpu_train_op()
    if (op is None or x.device.type != "cpu" or weight.dim() != 2 or x.dim() < 1
            or x.shape[-1] != weight.shape[1] or _registry.forced_backend() is not None):
        return None
    try:
        sel = _registry.select("masked_linear", "cpu", x, weight, bits, bias, forced=None)
        if sel.backend != "cpu":
            return None
    except RuntimeError:
        return None
    n, k = weight.shape
    x2 = (x if x.dim() == 2 else x.reshape(-1, k)).contiguous()
    try:
        y = op(x2, weight.contiguous(), bits.contiguous(),
               None if bias is None else bias.contiguous())
    except (RuntimeError, ValueError, TypeError, IndexError):
        _check_linear("masked_linear", x, weight, bits, bias)
        raise
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def masked_linear(x: Tensor, weight: Tensor, bits: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y[..., N] = x[..., K] @ (weight ⊙ M)ᵀ + bias`` without materialising ``weight ⊙ M``.

    ``bits: int32[N, ceil(K/32)]`` is the packed mask. Differentiable in ``x``, ``weight`` and
    ``bias``: ``dx = dy @ (W ⊙ M)``, ``dW = (dyᵀ x) ⊙ M`` (off-mask entries exactly 0).
    """
    if _eager(x, weight, bits, bias):
        if _needs_grad(x, weight, bias):
            y = _profiled("masked_linear", _cpu_autograd, x, weight, bits, bias)
            if y is not None:
                return y
            return _profiled("masked_linear", _MaskedLinearFn.apply, x, weight, bits, bias)
        body = _ML_NATIVE.get(x.device.type, _masked_linear_body)
        return _profiled("masked_linear", body, x, weight, bits, bias)
    return torch.ops.lass_sparse.masked_linear(x, weight, bits, bias)


# ------------------------------------------------------------------------ segmented (mixed pairs)


def _check_segments(op: str, t: int, p: int, seg_offsets: Tensor, seg_pair: Tensor, device,
                    values: bool = True):
    if seg_offsets.dtype not in (torch.int32, torch.int64) or seg_offsets.dim() != 1:
        raise TypeError(f"{op}: seg_offsets must be int64[S+1], got {_desc(seg_offsets)}")
    if seg_pair.dtype not in (torch.int32, torch.int64) or seg_pair.dim() != 1:
        raise TypeError(f"{op}: seg_pair must be int64[S], got {_desc(seg_pair)}")
    if seg_offsets.shape[0] != seg_pair.shape[0] + 1:
        raise ValueError(
            f"{op}: seg_offsets must have len(seg_pair)+1={seg_pair.shape[0] + 1} entries, got "
            f"{seg_offsets.shape[0]}"
        )
    check_same_device(op, x=torch.empty(0, device=device), seg_offsets=seg_offsets,
                      seg_pair=seg_pair)
    if not values or seg_offsets.device.type == "meta":  # fake kernels: no data to read
        return
    offs = seg_offsets.tolist()
    if offs[0] != 0 or offs[-1] != t or any(a > b for a, b in zip(offs, offs[1:])):
        raise ValueError(
            f"{op}: seg_offsets must be non-decreasing from 0 to T={t}, got {offs[:8]}"
            f"{'...' if len(offs) > 8 else ''}"
        )
    pairs = seg_pair.tolist()
    bad = [q for q in pairs if not 0 <= q < p]
    if bad:
        raise ValueError(f"{op}: seg_pair ids must be in [0, P={p}), got {bad[0]}")


def _check_bank(op: str, bank: Tensor, n: int, k: int) -> None:
    if not isinstance(bank, Tensor) or bank.dim() != 3:
        got = _desc(bank) if isinstance(bank, Tensor) else type(bank).__name__
        raise ValueError(f"{op}: bits_bank must be int32[P, N={n}, {num_words(k)}], got {got}")
    check_bits(bank, (bank.shape[0], n), k, op, "bits_bank")


def _check_segmented(op, x, weight, bits_bank, seg_offsets, seg_pair, bias, values=True):
    _check_float(op, "x", x)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [T, K], got {_desc(x)}")
    _check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [N, K], got {_desc(weight)}")
    _check_bank(op, bits_bank, *weight.shape)
    _check_linear(op, x, weight, None, bias)
    check_same_device(op, x=x, bits_bank=bits_bank)
    _check_segments(op, x.shape[0], bits_bank.shape[0], seg_offsets, seg_pair, x.device, values)


def _segmented_masked_linear_body(
    x: Tensor, weight: Tensor, bits_bank: Tensor, seg_offsets: Tensor, seg_pair: Tensor,
    bias: Tensor | None,
) -> Tensor:
    _check_segmented("segmented_masked_linear", x, weight, bits_bank, seg_offsets, seg_pair, bias)
    return _dispatch(
        "segmented_masked_linear", x.device, x.contiguous(), weight.contiguous(),
        bits_bank.contiguous(), seg_offsets.long(), seg_pair.long(),
        None if bias is None else bias.contiguous(),
    )


_segmented_masked_linear = torch.library.custom_op(
    f"{NS}::segmented_masked_linear", _segmented_masked_linear_body, mutates_args=())


@_segmented_masked_linear.register_fake
def _(x, weight, bits_bank, seg_offsets, seg_pair, bias):
    _check_segmented("segmented_masked_linear", x, weight, bits_bank, seg_offsets, seg_pair, bias,
                     values=False)
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op(f"{NS}::segmented_masked_linear_dx", mutates_args=())
def _segmented_masked_linear_dx(
    grad_out: Tensor, weight: Tensor, bits_bank: Tensor, seg_offsets: Tensor, seg_pair: Tensor
) -> Tensor:
    _check_seg_dx(grad_out, weight, bits_bank, seg_offsets, seg_pair)
    return _dispatch(
        "segmented_masked_linear_dx", grad_out.device, grad_out.contiguous(), weight.contiguous(),
        bits_bank.contiguous(), seg_offsets.long(), seg_pair.long(),
    )


def _check_seg_dx(grad_out, weight, bits_bank, seg_offsets, seg_pair, values=True):
    op = "segmented_masked_linear_dx"
    _check_dx(op, grad_out, weight, bits_bank, bank=True)
    _check_segments(op, grad_out.shape[0], bits_bank.shape[0], seg_offsets, seg_pair,
                    grad_out.device, values)


@_segmented_masked_linear_dx.register_fake
def _(grad_out, weight, bits_bank, seg_offsets, seg_pair):
    _check_seg_dx(grad_out, weight, bits_bank, seg_offsets, seg_pair, values=False)
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1]))


@torch.library.custom_op(f"{NS}::segmented_masked_linear_dw", mutates_args=())
def _segmented_masked_linear_dw(
    grad_out: Tensor, x: Tensor, bits_bank: Tensor, seg_offsets: Tensor, seg_pair: Tensor
) -> Tensor:
    _check_seg_dw(grad_out, x, bits_bank, seg_offsets, seg_pair)
    return _dispatch(
        "segmented_masked_linear_dw", x.device, grad_out.contiguous(), x.contiguous(),
        bits_bank.contiguous(), seg_offsets.long(), seg_pair.long(),
    )


def _check_seg_dw(grad_out, x, bits_bank, seg_offsets, seg_pair, values=True):
    op = "segmented_masked_linear_dw"
    _check_dw(op, grad_out, x, bits_bank, bank=True)
    _check_segments(op, x.shape[0], bits_bank.shape[0], seg_offsets, seg_pair, x.device, values)


@_segmented_masked_linear_dw.register_fake
def _(grad_out, x, bits_bank, seg_offsets, seg_pair):
    _check_seg_dw(grad_out, x, bits_bank, seg_offsets, seg_pair, values=False)
    return x.new_empty((bits_bank.shape[1], x.shape[1]))


def _seg_setup(ctx, inputs, output):
    x, weight, bits_bank, seg_offsets, seg_pair, bias = inputs
    ctx.save_for_backward(x, weight, bits_bank, seg_offsets, seg_pair)
    ctx.has_bias = bias is not None


def _seg_backward(ctx, grad):
    x, weight, bank, offs, pair = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.lass_sparse.segmented_masked_linear_dx(grad, weight, bank, offs, pair)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.lass_sparse.segmented_masked_linear_dw(grad, x, bank, offs, pair)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        db = grad.sum(0)
    return dx, dw, None, None, None, db


_segmented_masked_linear.register_autograd(_seg_backward, setup_context=_seg_setup)


def segmented_masked_linear(
    x: Tensor,
    weight: Tensor,
    bits_bank: Tensor,
    seg_offsets: Tensor,
    seg_pair: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """Mixed-pair masked linear: rows ``seg_offsets[s]:seg_offsets[s+1]`` of ``x[T, K]`` use
    mask ``bits_bank[seg_pair[s]]`` (``bits_bank: int32[P, N, ceil(K/32)]``). Returns ``[T, N]``.

    ``seg_offsets: int64[S+1]`` is non-decreasing from 0 to T (empty segments allowed);
    ``seg_pair: int64[S]`` holds pair ids in ``[0, P)`` in any order.
    """
    return torch.ops.lass_sparse.segmented_masked_linear(
        x, weight, bits_bank, seg_offsets, seg_pair, bias
    )


# ---------------------------------------------------------------------------- fused QKV projection


def _check_qkv(x, weight, bits, bias, num_heads):
    op = "masked_qkv_proj"
    _check_float(op, "x", x)
    _check_float(op, "weight", weight)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, T, D], got {_desc(x)}")
    d = x.shape[-1]
    if list(weight.shape) != [3 * d, d]:
        raise ValueError(f"{op}: weight must be [3D, D] = [{3 * d}, {d}], got {_desc(weight)}")
    if num_heads <= 0 or d % num_heads:
        raise ValueError(f"{op}: num_heads must divide D={d}, got {num_heads}")
    _check_linear(op, x, weight, bits, bias)


def _masked_qkv_proj_body(
    x: Tensor, weight: Tensor, bits: Tensor, bias: Tensor | None, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    _check_qkv(x, weight, bits, bias, num_heads)
    return _dispatch(
        "masked_qkv_proj", x.device, x.contiguous(), weight.contiguous(), bits.contiguous(),
        None if bias is None else bias.contiguous(), num_heads,
    )


_masked_qkv_proj = torch.library.custom_op(f"{NS}::masked_qkv_proj", _masked_qkv_proj_body,
                                           mutates_args=())


@_masked_qkv_proj.register_fake
def _(x, weight, bits, bias, num_heads):
    _check_qkv(x, weight, bits, bias, num_heads)
    b, t, d = x.shape
    shape = (b, num_heads, t, d // num_heads)
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)


def _qkv_setup(ctx, inputs, output):
    x, weight, bits, bias, num_heads = inputs
    ctx.save_for_backward(x, weight, bits)
    ctx.has_bias = bias is not None


def _qkv_backward(ctx, dq, dk, dv):
    x, weight, bits = ctx.saved_tensors
    b, t, d = x.shape
    # [B, H, T, Dh] x3 -> [B*T, 3D] in the weight's row order (q rows, k rows, v rows).
    dy = torch.stack([dq, dk, dv], 0).permute(1, 3, 0, 2, 4).reshape(b * t, 3 * d)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = _dx(dy, weight, bits).reshape(b, t, d)
    if ctx.needs_input_grad[1]:
        dw = _dw(dy, x.reshape(b * t, d), bits)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = dy.sum(0)
    return dx, dw, None, db, None


_masked_qkv_proj.register_autograd(_qkv_backward, setup_context=_qkv_setup)


class _MaskedQKVFn(torch.autograd.Function):
    """The eager twin of the op's registered autograd."""

    @staticmethod
    def forward(ctx, x, weight, bits, bias, num_heads):
        q, k, v = _masked_qkv_proj_body(x, weight, bits, bias, num_heads)
        _qkv_setup(ctx, (x, weight, bits, bias, num_heads), (q, k, v))
        return q, k, v

    backward = staticmethod(_qkv_backward)


def masked_qkv_proj(
    x: Tensor, weight: Tensor, bits: Tensor, bias: Tensor | None, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Masked packed in-projection: ``x[B, T, D]``, ``weight[3D, D]`` (q, k, v rows stacked, as
    ``nn.MultiheadAttention.in_proj_weight``), ``bits: int32[3D, ceil(D/32)]``. Returns q, k, v
    each ``[B, H, T, D/H]``, the layout ``scaled_dot_product_attention`` takes."""
    if _eager(x, weight, bits, bias):
        if _needs_grad(x, weight, bias):
            return _profiled("masked_qkv_proj", _MaskedQKVFn.apply, x, weight, bits, bias,
                             num_heads)
        return _profiled("masked_qkv_proj", _masked_qkv_proj_body, x, weight, bits, bias,
                         num_heads)
    return torch.ops.lass_sparse.masked_qkv_proj(x, weight, bits, bias, num_heads)


# ----------------------------------------------------------------------------------- masked AdamW


def _masked_adamw_body(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bits: list[Tensor | None],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    maximize: bool,
) -> None:
    def check() -> None:
        _check_adamw(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps,
                     weight_decay, step, real=True)

    n = len(params)
    if not params or not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(bits) == n):
        check()  # raises on unequal lengths; an empty list is a no-op
        return
    _check_hyper("masked_adamw_", lr, beta1, beta2, eps, weight_decay, step)
    if not isinstance(params[0], Tensor):
        check()
    _registry.dispatch_checked(
        "masked_adamw_", params[0].device, check, list(params),
        [g.contiguous() for g in grads], list(exp_avgs), list(exp_avg_sqs),
        [None if b is None else b.contiguous() for b in bits], float(lr), float(beta1),
        float(beta2), float(eps), float(weight_decay), int(step), bool(maximize),
    )


_masked_adamw_ = torch.library.custom_op(
    f"{NS}::masked_adamw_", _masked_adamw_body, mutates_args=("params", "exp_avgs", "exp_avg_sqs")
)


def _check_hyper(op, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """The checks ``torch.optim.AdamW`` makes, plus finiteness and the step count."""
    if not (0.0 <= lr and math.isfinite(lr)):
        raise ValueError(f"{op}: invalid learning rate {lr}: must be finite and >= 0")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{op}: invalid {name} {beta}: must be in [0, 1)")
    if not (0.0 <= eps and math.isfinite(eps)):
        raise ValueError(f"{op}: invalid epsilon {eps}: must be finite and >= 0")
    if not (0.0 <= weight_decay and math.isfinite(weight_decay)):
        raise ValueError(f"{op}: invalid weight_decay {weight_decay}: must be finite and >= 0")
    try:
        count = operator.index(step)
    except TypeError:
        count = None
    if isinstance(step, bool) or count is None or count < 1:
        raise ValueError(
            f"{op}: step must be an int >= 1 (the step count including this update; bias "
            f"correction divides by 1 - beta**step), got {step!r}"
        )


def _check_no_overlap(op: str, spans: list[tuple[str, Tensor, bool]]) -> None:
    """Raise if a written tensor (flag True) shares memory with any other listed tensor: a
    duplicate param, or exp_avg aliasing exp_avg_sq, would be updated twice."""
    items = []
    for name, t, written in spans:
        if t.numel() == 0 or t.device.type == "meta" or not t.is_contiguous():
            continue
        try:
            lo = t.data_ptr()
        except RuntimeError:  # fake / functional tensors have no memory to compare
            return
        items.append((str(t.device), lo, lo + t.numel() * t.element_size(), name, written))
    items.sort(key=lambda i: (i[0], i[1]))
    dev = None
    any_end = w_end = 0
    any_name = w_name = ""
    for d, lo, hi, name, written in items:
        if d != dev:
            dev, any_end, w_end = d, 0, 0
        other = any_name if written and lo < any_end else w_name if lo < w_end else None
        if other is not None:
            raise ValueError(
                f"{op}: {other} and {name} share memory (a duplicate parameter, or optimizer "
                "state aliasing another tensor); every param, exp_avg and exp_avg_sq must be "
                "its own tensor"
            )
        if hi > any_end:
            any_end, any_name = hi, name
        if written and hi > w_end:
            w_end, w_name = hi, name


def _check_adamw(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps,
                 weight_decay, step, real: bool) -> bool:
    """All checks of ``masked_adamw_``; False when there is nothing to update."""
    op = "masked_adamw_"
    lens = {len(params), len(grads), len(exp_avgs), len(exp_avg_sqs), len(bits)}
    if len(lens) != 1:
        raise ValueError(
            f"{op}: params, grads, exp_avgs, exp_avg_sqs and bits must have one length, got "
            f"{len(params)}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}, {len(bits)}"
        )
    _check_hyper(op, lr, beta1, beta2, eps, weight_decay, step)
    if not params:
        return False
    _check_float(op, "params[0]", params[0])
    for i, (p, g, m, v, b) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, bits)):
        _check_float(op, f"params[{i}]", p)
        _check_float(op, f"grads[{i}]", g)
        if not p.is_contiguous():
            raise ValueError(f"{op}: params[{i}] must be contiguous")
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(f"{op}: grads[{i}] must be {_desc(p)}, got {_desc(g)}")
        for name, t in (("exp_avgs", m), ("exp_avg_sqs", v)):
            _check_float(op, f"{name}[{i}]", t)
            if t.shape != p.shape or t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(
                    f"{op}: {name}[{i}] must be contiguous float32{list(p.shape)}, got {_desc(t)}"
                )
        if b is not None:
            if p.dim() < 1:
                raise ValueError(f"{op}: a masked param must have >= 1 dim, params[{i}] is 0-d")
            check_bits(b, tuple(p.shape[:-1]), p.shape[-1], op, f"bits[{i}]")
        check_same_device(op, **{"params[0]": params[0], f"params[{i}]": p, f"grads[{i}]": g,
                                 f"exp_avgs[{i}]": m, f"exp_avg_sqs[{i}]": v, f"bits[{i}]": b})
    if real:
        spans = []
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            spans += [(f"params[{i}]", p, True), (f"exp_avgs[{i}]", m, True),
                      (f"exp_avg_sqs[{i}]", v, True), (f"grads[{i}]", g, False)]
        _check_no_overlap(op, spans)
    return True


@_masked_adamw_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps, weight_decay, step,
      maximize):
    _check_adamw(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps, weight_decay,
                 step, real=False)
    return None


def masked_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    bits: Sequence[Tensor | None],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    step: int,
    maximize: bool = False,
) -> None:
    """One AdamW step, in place, over a list of params (one launch where the backend can).

    Entries whose mask bit is 1 (every entry when ``bits[i] is None``) get the AdamW update
    (decoupled weight decay, bias correction for ``step`` >= 1); entries whose bit is 0 keep
    ``p``, ``exp_avg`` and ``exp_avg_sq`` bit-for-bit. State is float32 for any param dtype.
    """
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(bits), lr, beta1,
            beta2, eps, weight_decay, step, maximize)
    # direct in plain eager under no_grad (as optimizers step); mutation under grad mode, and
    # every traced call, through the op
    if not torch.is_grad_enabled() and _eager(*args[0], *args[1], *args[2], *args[3], *args[4]):
        dev = args[0][0].device.type if args[0] and isinstance(args[0][0], Tensor) else None
        _profiled("masked_adamw_", _ADAMW_NATIVE.get(dev, _masked_adamw_body), *args)
        return
    torch.ops.lass_sparse.masked_adamw_(*args)


# ------------------------------------------------------------------- native kernels' deferral


# Ops whose C++ kernels register under the public name (csrc/common/entry.h). Such a kernel
# defers to ``lass_sparse::<op>.registry``, the op's own schema (read from the op, not written
# again) with its Python body, when another backend is forced or it refuses the inputs: the body
# words the error, or the registry picks a backend that takes them (e.g. the reference for
# float16). Called only from those kernels, below autograd.
_NATIVE_BODIES = {
    "pack_mask": _pack_mask_body,
    "unpack_mask": _unpack_mask_body,
    "magnitude_mask": _magnitude_mask_body,
    "masked_linear": _masked_linear_body,
    "masked_linear_dx": _masked_linear_dx_body,
    "masked_linear_dw": _masked_linear_dw_body,
    "masked_linear_dw_accumulate_": _dw_accumulate_body,
    "segmented_masked_linear": _segmented_masked_linear_body,
    "masked_adamw_": _masked_adamw_body,
}
_REGISTRY_LIB = torch.library.Library(NS, "FRAGMENT")
for _name, _body in _NATIVE_BODIES.items():
    _schema = str(getattr(torch.ops.lass_sparse, _name).default._schema)
    _REGISTRY_LIB.define(f"{_name}.registry(" + _schema.split("(", 1)[1])
    _REGISTRY_LIB.impl(f"{_name}.registry", _body, "CompositeExplicitAutograd")

# The direct path's kernels by device type (C++ entries on CPU and CUDA; others: the op body).
_ML_NATIVE = {"cpu": _native_kernel("masked_linear"),
              "cuda": _native_kernel("masked_linear", "CUDA")}
_ADAMW_NATIVE = {"cpu": _native_kernel("masked_adamw_"),
                 "cuda": _native_kernel("masked_adamw_", "CUDA")}
_GRAD_CPU = {"masked_linear_dx": _native_kernel("masked_linear_dx"),
             "masked_linear_dw": _native_kernel("masked_linear_dw")}
