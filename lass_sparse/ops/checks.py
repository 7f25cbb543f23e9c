"""Input validation of every op: dtypes, shapes, one device, and (in the op bodies only) the
values the kernels index with.

Each ``check_<op>`` raises ``TypeError`` / ``ValueError`` with a message that names the op, the
argument, what was expected and what was given (``masked_linear: bits must be int32[4096, 32],
got int32[4096, 31]``). The op bodies (:mod:`.bodies`) and the fake kernels (:mod:`.schema`) run
the same checks, so a meta tensor among real ones is an error naming the argument, never an
uninitialised result; checks that read values (segment offsets, pair ids, aliasing of optimizer
state) run in the bodies only (``values`` / ``real``).
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from ..bitmask import check_bits, check_same_device, num_words
from .segments import check_on_device, host_table, readable

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def desc(t: Tensor) -> str:
    """``float32[4, 8]``: how error messages name a tensor."""
    return f"{dt(t.dtype)}{list(t.shape)}"


def check_float(op: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32, float64, bfloat16 or float16, got {desc(t)}"
        )


# --------------------------------------------------------------------------------- pack / unpack


def check_pack(mask: Tensor) -> None:
    if mask.dtype != torch.bool or mask.dim() < 1:
        raise TypeError(f"pack_mask: mask must be bool[..., K], got {desc(mask)}")


def check_unpack(bits: Tensor, k: int) -> None:
    if k < 0:
        raise ValueError(f"unpack_mask: k must be >= 0, got {k}")
    if bits.dtype != torch.int32 or bits.dim() < 1 or bits.shape[-1] != num_words(k):
        raise ValueError(
            f"unpack_mask: bits must be int32[..., ceil(k/32)={num_words(k)}] for k={k}, "
            f"got {desc(bits)}"
        )


def check_magnitude(weight: Tensor, alpha: float) -> None:
    check_float("magnitude_mask", "weight", weight)
    if weight.dim() < 1:
        raise ValueError(f"magnitude_mask: weight must have at least 1 dim, got {desc(weight)}")
    if not (0.0 <= alpha < 1.0):
        raise ValueError(f"magnitude_mask: alpha must be in [0, 1), got {alpha}")


# ---------------------------------------------------------------------------------- masked cast


def check_cast(weight: Tensor, bits: Tensor, dtype: torch.dtype) -> None:
    """weight [..., K] of a float dtype, bits int32[..., ceil(K/32)] of its leading sizes, one
    device, and a float output dtype."""
    check_float("masked_cast", "weight", weight)
    if weight.dim() < 1:
        raise ValueError(f"masked_cast: weight must be [..., K], got {desc(weight)}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"masked_cast: dtype must be float32, float64, bfloat16 or float16, "
                        f"got {dtype}")
    check_bits(bits, tuple(weight.shape[:-1]), weight.shape[-1], "masked_cast")
    check_same_device("masked_cast", weight=weight, bits=bits)


# --------------------------------------------------------------------------------- masked linear


def check_linear(op: str, x: Tensor, weight: Tensor, bits: Tensor | None,
                 bias: Tensor | None) -> None:
    """x [..., K], weight [N, K], bits int32[N, ceil(K/32)] (None: checked by the caller), bias
    [N]: dtypes, shapes, and one device for all of them."""
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [N, K], got {desc(weight)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must be [..., K={k}] to match weight [N, K], got {desc(x)}")
    if x.dtype != weight.dtype:
        raise TypeError(
            f"{op}: x and weight must share a dtype, got x {x.dtype} and weight {weight.dtype}"
        )
    if bits is not None:
        check_bits(bits, (n,), k, op)
    if bias is not None:
        check_float(op, "bias", bias)
        if list(bias.shape) != [n] or bias.dtype != weight.dtype:
            raise ValueError(f"{op}: bias must be {dt(weight.dtype)}[{n}], got {desc(bias)}")
    check_same_device(op, x=x, weight=weight, bits=bits, bias=bias)


def check_dx(op: str, grad_out: Tensor, weight: Tensor, bits: Tensor, bank: bool = False):
    check_float(op, "grad_out", grad_out)
    check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [N, K], got {desc(weight)}")
    n, k = weight.shape
    if grad_out.dim() != 2 or grad_out.shape[1] != n:
        raise ValueError(f"{op}: grad_out must be [M, N={n}], got {desc(grad_out)}")
    if grad_out.dtype != weight.dtype:
        raise TypeError(f"{op}: grad_out and weight must share a dtype, got {grad_out.dtype} and "
                        f"{weight.dtype}")
    if bank:
        check_bank(op, bits, n, k)
    else:
        check_bits(bits, (n,), k, op)
    check_same_device(op, grad_out=grad_out, weight=weight, bits=bits)


def check_dw(op: str, grad_out: Tensor, x: Tensor, bits: Tensor, bank: bool = False) -> None:
    check_float(op, "grad_out", grad_out)
    check_float(op, "x", x)
    if grad_out.dim() != 2 or x.dim() != 2 or grad_out.shape[0] != x.shape[0]:
        raise ValueError(
            f"{op}: grad_out must be [M, N] and x [M, K] with the same M, got "
            f"{desc(grad_out)} and {desc(x)}"
        )
    if grad_out.dtype != x.dtype:
        raise TypeError(f"{op}: grad_out and x must share a dtype, got {grad_out.dtype}, {x.dtype}")
    if bank:
        check_bank(op, bits, grad_out.shape[1], x.shape[1])
    else:
        check_bits(bits, (grad_out.shape[1],), x.shape[1], op)
    check_same_device(op, grad_out=grad_out, x=x, bits=bits)


def check_accumulate(grad, grad_out, x, bits) -> None:
    op = "masked_linear_dw_accumulate_"
    check_dw(op, grad_out, x, bits)
    check_float(op, "grad", grad)
    want = [grad_out.shape[1], x.shape[1]]
    if list(grad.shape) != want or grad.dtype not in (torch.float32, x.dtype):
        alt = "" if x.dtype == torch.float32 else f" or {dt(x.dtype)}{want}"
        raise ValueError(f"{op}: grad must be float32{want}{alt}, got {desc(grad)}")
    if not grad.is_contiguous():
        raise ValueError(f"{op}: grad must be contiguous")
    check_same_device(op, x=x, grad=grad)


# ------------------------------------------------------------------------ segmented (mixed pairs)


def check_segments(op: str, t: int, p: int, seg_offsets: Tensor, seg_pair: Tensor, device,
                   values: bool = True):
    if seg_offsets.dtype not in (torch.int32, torch.int64) or seg_offsets.dim() != 1:
        raise TypeError(f"{op}: seg_offsets must be int64[S+1], got {desc(seg_offsets)}")
    if seg_pair.dtype not in (torch.int32, torch.int64) or seg_pair.dim() != 1:
        raise TypeError(f"{op}: seg_pair must be int64[S], got {desc(seg_pair)}")
    if seg_offsets.shape[0] != seg_pair.shape[0] + 1:
        raise ValueError(
            f"{op}: seg_offsets must have len(seg_pair)+1={seg_pair.shape[0] + 1} entries, got "
            f"{seg_offsets.shape[0]}"
        )
    check_same_device(op, x=torch.empty(0, device=device), seg_offsets=seg_offsets,
                      seg_pair=seg_pair)
    if not values or seg_offsets.device.type == "meta":  # fake kernels: no data to read
        return
    if not readable(seg_offsets, seg_pair):  # CUDA graph capture: checked on the device
        check_on_device(op, t, p, seg_offsets, seg_pair)
        return
    offs, pairs = host_table(seg_offsets, seg_pair)  # read from the device once per table
    if offs[0] != 0 or offs[-1] != t or any(a > b for a, b in zip(offs, offs[1:])):
        raise ValueError(
            f"{op}: seg_offsets must be non-decreasing from 0 to T={t}, got {offs[:8]}"
            f"{'...' if len(offs) > 8 else ''}"
        )
    bad = [q for q in pairs if not 0 <= q < p]
    if bad:
        raise ValueError(f"{op}: seg_pair ids must be in [0, P={p}), got {bad[0]}")


def check_bank(op: str, bank: Tensor, n: int, k: int) -> None:
    if not isinstance(bank, Tensor) or bank.dim() != 3:
        got = desc(bank) if isinstance(bank, Tensor) else type(bank).__name__
        raise ValueError(f"{op}: bits_bank must be int32[P, N={n}, {num_words(k)}], got {got}")
    check_bits(bank, (bank.shape[0], n), k, op, "bits_bank")


def check_segmented(op, x, weight, bits_bank, seg_offsets, seg_pair, bias, values=True):
    check_float(op, "x", x)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [T, K], got {desc(x)}")
    check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [N, K], got {desc(weight)}")
    check_bank(op, bits_bank, *weight.shape)
    check_linear(op, x, weight, None, bias)
    check_same_device(op, x=x, bits_bank=bits_bank)
    check_segments(op, x.shape[0], bits_bank.shape[0], seg_offsets, seg_pair, x.device, values)


def check_seg_dx(grad_out, weight, bits_bank, seg_offsets, seg_pair, values=True):
    op = "segmented_masked_linear_dx"
    check_dx(op, grad_out, weight, bits_bank, bank=True)
    check_segments(op, grad_out.shape[0], bits_bank.shape[0], seg_offsets, seg_pair,
                   grad_out.device, values)


def check_seg_dw(grad_out, x, bits_bank, seg_offsets, seg_pair, values=True):
    op = "segmented_masked_linear_dw"
    check_dw(op, grad_out, x, bits_bank, bank=True)
    check_segments(op, x.shape[0], bits_bank.shape[0], seg_offsets, seg_pair, x.device, values)


# ---------------------------------------------------------------------------- fused QKV projection


def check_qkv(x, weight, bits, bias, num_heads):
    op = "masked_qkv_proj"
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, T, D], got {desc(x)}")
    d = x.shape[-1]
    if list(weight.shape) != [3 * d, d]:
        raise ValueError(f"{op}: weight must be [3D, D] = [{3 * d}, {d}], got {desc(weight)}")
    if num_heads <= 0 or d % num_heads:
        raise ValueError(f"{op}: num_heads must divide D={d}, got {num_heads}")
    check_linear(op, x, weight, bits, bias)


# ----------------------------------------------------------------------------------- masked AdamW


def check_hyper(op, lr, beta1, beta2, eps, weight_decay, step) -> None:
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


def check_no_overlap(op: str, spans: list[tuple[str, Tensor, bool]]) -> None:
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


def check_adamw(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps,
                weight_decay, step, real: bool, op: str = "masked_adamw_") -> bool:
    """All checks of ``masked_adamw_``; False when there is nothing to update."""
    lens = {len(params), len(grads), len(exp_avgs), len(exp_avg_sqs), len(bits)}
    if len(lens) != 1:
        raise ValueError(
            f"{op}: params, grads, exp_avgs, exp_avg_sqs and bits must have one length, got "
            f"{len(params)}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}, {len(bits)}"
        )
    check_hyper(op, lr, beta1, beta2, eps, weight_decay, step)
    if not params:
        return False
    check_float(op, "params[0]", params[0])
    for i, (p, g, m, v, b) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, bits)):
        check_float(op, f"params[{i}]", p)
        check_float(op, f"grads[{i}]", g)
        if not p.is_contiguous():
            raise ValueError(f"{op}: params[{i}] must be contiguous")
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(f"{op}: grads[{i}] must be {desc(p)}, got {desc(g)}")
        for name, t in (("exp_avgs", m), ("exp_avg_sqs", v)):
            check_float(op, f"{name}[{i}]", t)
            if t.shape != p.shape or t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(
                    f"{op}: {name}[{i}] must be contiguous float32{list(p.shape)}, got {desc(t)}"
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
        check_no_overlap(op, spans)
    return True


def check_adamw_capturable(params, grads, exp_avgs, exp_avg_sqs, bits, state_steps, lr, beta1,
                           beta2, eps, weight_decay, real: bool) -> bool:
    """All checks of ``masked_adamw_capturable_``: those of ``masked_adamw_`` (the step count is
    a tensor here), plus ``state_steps`` (one 1-element floating tensor per param, on its
    device) and ``lr`` (a 1-element floating tensor on the params' device). Their values are
    not read: that would be a device sync (as ``torch.optim.AdamW(capturable=True)``)."""
    op = "masked_adamw_capturable_"
    if len(state_steps) != len(params):
        raise ValueError(f"{op}: state_steps must have one entry per param ({len(params)}), got "
                         f"{len(state_steps)}")
    if not (isinstance(lr, Tensor) and lr.numel() == 1 and lr.is_floating_point()):
        got = desc(lr) if isinstance(lr, Tensor) else type(lr).__name__
        raise TypeError(f"{op}: lr must be a 1-element floating tensor on the params' device, "
                        f"got {got}")
    if not check_adamw(params, grads, exp_avgs, exp_avg_sqs, bits, 0.0, beta1, beta2, eps,
                       weight_decay, 1, real, op=op):
        return False
    for i, (p, s) in enumerate(zip(params, state_steps)):
        if not (isinstance(s, Tensor) and s.numel() == 1 and s.is_floating_point()):
            got = desc(s) if isinstance(s, Tensor) else type(s).__name__
            raise TypeError(f"{op}: state_steps[{i}] must be a 1-element floating tensor (the "
                            f"step count including this update), got {got}")
        check_same_device(op, **{f"params[{i}]": p, f"state_steps[{i}]": s, "lr": lr})
    return True
