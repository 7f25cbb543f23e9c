"""Hardening of the op layer (issue 20, part B): every registered op rejects wrong sizes with a
Python exception (never a signal or an out-of-bounds read), devices agree before any kernel
(fake or real) runs, the non-finite contract (a masked-out weight is not used), zero-size shapes,
forced backends that cannot take a dtype, and optimizer argument checks."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import lass_sparse
from lass_sparse.bitmask import pack_mask_reference, unpack_mask_reference
from lass_sparse.ops import registry as _registry
from lass_sparse.optim import MaskedAdamW
from lass_sparse.testing import cpu_kernels, cuda_kernels, triton_device

BACKENDS = [n for n in ("reference", "cpu") if lass_sparse.backends()[n]["active"]]
# Triton where it serves CPU tensors (the interpreter); on a GPU machine it registers for CUDA
# only, and test_device_parity covers it there.
ALL_BACKENDS = BACKENDS + [n for n in ("triton",) if lass_sparse.backends()[n]["active"]
                           and triton_device() == "cpu"]
NAMESPACES = ("lass_sparse", "lass_sparse_cpu")


def _bits(n, k, p=0.5, lead=()):
    return pack_mask_reference(torch.rand(*lead, n, k) < p)


def _i32(*shape):
    return torch.zeros(*shape, dtype=torch.int32)


# ----------------------------------------------------------------- wrong sizes, every op (item 1)
# CASES[namespace][op]: (label, args builder) pairs; every call must raise. A registered op with
# no entry fails the test, so a new op cannot ship without its bad-input cases.


def _adamw_lists(p, g=None, m=None, v=None, b=None):
    return ([p], [torch.randn_like(p) if g is None else g],
            [torch.zeros_like(p) if m is None else m], [torch.zeros_like(p) if v is None else v],
            [b])


_HP = (1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False)
_BIG = (1024, 1024)  # big enough that an unchecked over-read leaves the allocation


def _linear_cases(dev="cpu", public=True):
    f = dict(device=dev)
    x, w = torch.randn(8, 4096, **f), torch.randn(8, 4096, **f)
    bits = _i32(8, 128).to(dev)
    cases = [
        ("bits with too few words", lambda: (x, w, _i32(8, 1).to(dev), None)),
        ("bits with too few rows", lambda: (x, w, _i32(1, 128).to(dev), None)),
        ("bits int64", lambda: (x, w, bits.long(), None)),
        ("bits 1-D", lambda: (x, w, _i32(128).to(dev), None)),
        ("x with a shorter K", lambda: (torch.randn(8, 100, **f), w, bits, None)),
        ("weight 1-D", lambda: (x, torch.randn(4096, **f), bits, None)),
        ("bias too short", lambda: (x, w, bits, torch.randn(1, **f))),
        ("bias of another dtype", lambda: (x, w, bits, torch.randn(8, dtype=torch.float64, **f))),
        ("x and weight dtypes differ", lambda: (x.double(), w, bits, None)),
        ("int x", lambda: (x.long(), w.long(), bits, None)),
    ]
    if not public:  # kernel entry points take 2-D contiguous tensors only
        cases += [("non-contiguous x", lambda: (torch.randn(4096, 8, **f).t(), w, bits, None)),
                  ("non-contiguous bits", lambda: (x, w, _i32(128, 8).to(dev).t(), None)),
                  ("3-D x", lambda: (x.reshape(2, 4, 4096), w, bits, None))]
    return cases


def _dx_cases(dev="cpu", public=True):
    f = dict(device=dev)
    dy, w, bits = torch.randn(8, 8, **f), torch.randn(8, 4096, **f), _i32(8, 128).to(dev)
    cases = [
        ("bits with too few words", lambda: (dy, w, _i32(8, 1).to(dev))),
        ("bits with too few rows", lambda: (dy, w, _i32(1, 128).to(dev))),
        ("grad_out with the wrong N", lambda: (torch.randn(8, 3, **f), w, bits)),
        ("grad_out of another dtype", lambda: (dy.double(), w, bits)),
        ("weight 1-D", lambda: (dy, torch.randn(4096, **f), bits)),
    ]
    if not public:
        cases += [("non-contiguous grad_out", lambda: (torch.randn(8, 8, **f).t()[:, :8], w,
                                                       bits)),
                  ("non-contiguous weight", lambda: (dy, torch.randn(4096, 8, **f).t(), bits))]
    return cases


def _dw_cases(dev="cpu", public=True):
    f = dict(device=dev)
    g, x = torch.randn(8, 4096, **f), torch.randn(8, 4096, **f)
    cases = [
        ("all-zero bits with one word for K=4096", lambda: (g, x, _i32(4096, 1).to(dev))),
        ("bits with too few rows", lambda: (g, x, _i32(1, 128).to(dev))),
        ("grad_out and x with different M", lambda: (g[:3], x, _i32(4096, 128).to(dev))),
        ("grad_out of another dtype", lambda: (g.double(), x, _i32(4096, 128).to(dev))),
        ("x 1-D", lambda: (g, torch.randn(4096, **f), _i32(4096, 128).to(dev))),
    ]
    if not public:
        cases += [("non-contiguous x", lambda: (g, torch.randn(4096, 8, **f).t(),
                                                _i32(4096, 128).to(dev)))]
    return cases


def _acc_cases(dev="cpu", public=True):
    f = dict(device=dev)
    g, x = torch.randn(8, 64, **f), torch.randn(8, 4096, **f)
    grad, bits = torch.zeros(64, 4096, **f), _i32(64, 128).to(dev)
    cases = [
        ("bits with one word for K=4096", lambda: (grad, g, x, _i32(64, 1).to(dev))),
        ("bits with too few rows", lambda: (grad, g, x, _i32(1, 128).to(dev))),
        ("grad too small", lambda: (torch.zeros(1, 1, **f), g, x, bits)),
        ("grad_out and x with different M", lambda: (grad, g[:2], x, bits)),
        ("grad not contiguous", lambda: (torch.zeros(4096, 64, **f).t(), g, x, bits)),
        ("int grad", lambda: (grad.int(), g, x, bits)),
    ]
    return cases


def _seg_args(t=8, k=4096, n=8, p=2, dev="cpu"):
    f = dict(device=dev)
    return (torch.randn(t, k, **f), torch.randn(n, k, **f), _i32(p, n, (k + 31) // 32).to(dev),
            torch.tensor([0, t], device=dev), torch.tensor([0], device=dev))


def _seg_cases(dev="cpu", values=True):
    """values: also tables of wrong values (the op checks them; the CUDA kernel, given them
    directly, clamps them instead: only its size checks raise)."""
    x, w, bank, offs, pair = _seg_args(dev=dev)
    f = dict(device=dev)
    cases = [
        ("bank with one word for K=4096", lambda: (x, w, _i32(1, 8, 1).to(dev), offs, pair,
                                                   None)),
        ("bank 2-D", lambda: (x, w, bank[0], offs, pair, None)),
        ("bank with too few rows", lambda: (x, w, bank[:, :1], offs, pair, None)),
        ("offsets/pair lengths disagree", lambda: (x, w, bank, offs,
                                                   torch.tensor([0, 1], **f), None)),
        ("float offsets", lambda: (x, w, bank, offs.float(), pair, None)),
        ("bias too short", lambda: (x, w, bank, offs, pair, torch.randn(1, **f))),
    ]
    if values:
        cases += [
            ("offsets past T", lambda: (x, w, bank, torch.tensor([0, 9], **f), pair, None)),
            ("decreasing offsets", lambda: (x, w, bank, torch.tensor([0, 6, 2, 8], **f),
                                            torch.tensor([0, 1, 0], **f), None)),
            ("pair id out of range", lambda: (x, w, bank, offs, torch.tensor([2], **f), None)),
            ("negative pair id", lambda: (x, w, bank, offs, torch.tensor([-1], **f), None)),
        ]
    return cases


def _seg_grad_cases(kind):
    x, w, bank, offs, pair = _seg_args()
    g = torch.randn(8, 8)
    first = w if kind == "dx" else x
    return [
        ("bank with one word for K=4096", lambda: (g, first, _i32(1, 8, 1), offs, pair)),
        ("bank 2-D", lambda: (g, first, bank[0], offs, pair)),
        ("offsets past T", lambda: (g, first, bank, torch.tensor([0, 9]), pair)),
        ("pair id out of range", lambda: (g, first, bank, offs, torch.tensor([5]))),
        ("grad_out with the wrong N", lambda: (torch.randn(8, 3), first, bank, offs, pair)),
        ("grad_out of another dtype", lambda: (g.double(), first, bank, offs, pair)),
    ]


def _seg_kernel_cases(kind):
    """What only the C++ entries see (the op's checks come first elsewhere): tables of another
    dtype or on the meta device, decreasing offsets, a bf16 grad_out (the AMX path's dtype)."""
    x, w, bank, offs, pair = _seg_args()
    g = torch.randn(8, 8)
    first = w if kind == "dx" else x
    return [
        ("int32 offsets", lambda: (g, first, bank, offs.int(), pair)),
        ("meta pairs", lambda: (g, first, bank, offs, pair.to("meta"))),
        ("decreasing offsets", lambda: (g, first, bank, torch.tensor([0, 9, 8]),
                                        torch.tensor([0, 0]))),
        ("bf16 grad_out, fp32 rest", lambda: (g.bfloat16(), first, bank, offs, pair)),
        ("bf16 with the wrong T", lambda: (torch.randn(3, 8).bfloat16(), first.bfloat16(), bank,
                                           offs, pair)),
    ]


def _remember_cases():
    offs, pair = torch.tensor([0, 2, 4]), torch.tensor([1, 0])
    return [
        ("fewer offsets than the tensor", lambda: (offs, pair, [0, 2], [1, 0])),
        ("offsets not from 0", lambda: (offs, pair, [1, 2, 4], [1, 0])),
        ("decreasing offsets", lambda: (offs, pair, [0, 3, 2], [1, 0])),
        ("negative pair id", lambda: (offs, pair, [0, 2, 4], [-1, 0])),
        ("offsets 2-D", lambda: (offs.view(3, 1), pair, [0, 2, 4], [1, 0])),
        ("pairs as floats", lambda: (offs, pair, [0, 2, 4], [1.5, 0])),
    ]


def _qkv_cases(dev="cpu", t=3):
    f = dict(device=dev)
    x, w, bits = torch.randn(2, t, 64, **f), torch.randn(192, 64, **f), _i32(192, 2).to(dev)
    return [
        ("bits with one word too few", lambda: (x, w, _i32(192, 1).to(dev), None, 4)),
        ("bits with too few rows", lambda: (x, w, _i32(64, 2).to(dev), None, 4)),
        ("weight not [3D, D]", lambda: (x, torch.randn(64, 64, **f), bits, None, 4)),
        ("x 2-D", lambda: (x[0], w, bits, None, 4)),
        ("num_heads does not divide D", lambda: (x, w, bits, None, 5)),
        ("num_heads 0", lambda: (x, w, bits, None, 0)),
        ("bias too short", lambda: (x, w, bits, torch.randn(3, **f), 4)),
    ]


def _adamw_cases(dev="cpu", public=True):
    f = dict(device=dev)

    def p():
        return torch.randn(*_BIG, **f)

    big_bits = _i32(_BIG[0], _BIG[1] // 32).to(dev)
    cases = [
        ("grads of one element", lambda: (*_adamw_lists(p(), g=torch.randn(1, **f)), *_HP)),
        ("exp_avg of one element", lambda: (*_adamw_lists(p(), m=torch.zeros(1, **f)), *_HP)),
        ("exp_avg_sq of one element",
         lambda: (*_adamw_lists(p(), v=torch.zeros(1, **f)), *_HP)),
        ("bits with one word per row",
         lambda: (*_adamw_lists(p(), b=_i32(_BIG[0], 1).to(dev)), *_HP)),
        ("bits with one row", lambda: (*_adamw_lists(p(), b=_i32(1, 32).to(dev)), *_HP)),
        ("float64 state", lambda: (*_adamw_lists(p(), m=torch.zeros(*_BIG, dtype=torch.float64,
                                                                    **f)), *_HP)),
        ("grads of another dtype",
         lambda: (*_adamw_lists(p(), g=torch.randn(*_BIG, dtype=torch.float64, **f)), *_HP)),
        ("non-contiguous param", lambda: (*_adamw_lists(torch.randn(*_BIG, **f).t()), *_HP)),
        ("lists of different lengths",
         lambda: ([p()], [], [torch.zeros(*_BIG, **f)], [torch.zeros(*_BIG, **f)], [None], *_HP)),
        ("step 0", lambda: (*_adamw_lists(p(), b=big_bits), *_HP[:-2], 0, False)),
        ("lr nan", lambda: (*_adamw_lists(p()), math.nan, *_HP[1:])),
    ]
    return cases


def _adamw_capturable_cases(dev="cpu"):
    """``masked_adamw_`` cases with the step count and lr as device tensors (the step-0 and NaN
    lr cases do not apply: those values are not read on the host), and wrong step / lr tensors."""
    def capturable(make):
        def args():
            ps, gs, ms, vs, bs, lr, b1, b2, eps, wd, _step, mx = make()
            return (ps, gs, ms, vs, bs, [torch.ones((), device=dev) for _ in ps],
                    torch.tensor(lr, device=dev), b1, b2, eps, wd, mx)
        return args

    def p():
        return torch.randn(*_BIG, device=dev)

    good = capturable(lambda: (*_adamw_lists(p()), *_HP))
    return [(name, capturable(make)) for name, make in _adamw_cases(dev)
            if name not in ("step 0", "lr nan")] + [
        ("state_steps of two elements",
         lambda: (*good()[:5], [torch.ones(2, device=dev)], *good()[6:])),
        ("no state_steps", lambda: (*good()[:5], [], *good()[6:])),
        ("lr of two elements", lambda: (*good()[:6], torch.ones(2, device=dev), *good()[7:])),
        ("integer state_steps",
         lambda: (*good()[:5], [torch.ones((), dtype=torch.int64, device=dev)], *good()[6:])),
    ]


def _pack_cases(dev="cpu"):
    return [("int mask", lambda: (torch.ones(4, 40, dtype=torch.int32, device=dev),)),
            ("0-d mask", lambda: (torch.tensor(True, device=dev),))]


def _unpack_cases(dev="cpu"):
    return [("bits with too few words", lambda: (_i32(4, 1).to(dev), 4096)),
            ("negative k", lambda: (_i32(4, 0).to(dev), -5)),
            ("int64 bits", lambda: (torch.zeros(4, 2, dtype=torch.int64, device=dev), 40)),
            ("0-d bits", lambda: (torch.tensor(0, dtype=torch.int32, device=dev), 1))]


def _magnitude_cases(dev="cpu"):
    return [("0-d weight", lambda: (torch.tensor(1.0, device=dev), 0.5)),
            ("int weight", lambda: (torch.ones(4, 40, dtype=torch.int64, device=dev), 0.5))]


def _cast_cases(dev="cpu"):
    w = lambda *s: torch.randn(*s, device=dev)  # noqa: E731
    return [("bits with too few words", lambda: (w(4, 40), _i32(4, 1).to(dev), torch.bfloat16)),
            ("bits with too few rows", lambda: (w(4, 40), _i32(3, 2).to(dev), torch.float32)),
            ("int64 bits", lambda: (w(4, 40), torch.zeros(4, 2, dtype=torch.int64, device=dev),
                                    torch.float16)),
            ("0-d weight", lambda: (torch.tensor(1.0, device=dev),
                                    torch.tensor(0, dtype=torch.int32, device=dev),
                                    torch.float32)),
            ("int weight", lambda: (torch.ones(4, 40, dtype=torch.int64, device=dev),
                                    _i32(4, 2).to(dev), torch.float32)),
            ("int dtype", lambda: (w(4, 40), _i32(4, 2).to(dev), torch.int32)),
            ("3-D weight, 2-D bits", lambda: (w(2, 4, 40), _i32(4, 2).to(dev), torch.float32)),
            ("bits on meta", lambda: (w(4, 40), torch.zeros(4, 2, dtype=torch.int32,
                                                            device="meta"), torch.float32))]


def _public_extra_magnitude():
    return [("alpha 1.5", lambda: (torch.randn(4, 40), 1.5)),
            ("alpha nan", lambda: (torch.randn(4, 40), math.nan))]


def _cases() -> dict[str, dict[str, list]]:
    return {
        "lass_sparse": {
            "pack_mask": _pack_cases(),
            "unpack_mask": _unpack_cases(),
            "magnitude_mask": _magnitude_cases() + _public_extra_magnitude(),
            "masked_cast": _cast_cases(),
            "masked_linear": _linear_cases(),
            "masked_linear_dx": _dx_cases(),
            "masked_linear_dw": _dw_cases(),
            "masked_linear_dw_accumulate_": _acc_cases(),
            "segmented_masked_linear": _seg_cases(),
            "segmented_masked_linear_dx": _seg_grad_cases("dx"),
            "segmented_masked_linear_dw": _seg_grad_cases("dw"),
            "masked_qkv_proj": _qkv_cases(),
            "masked_adamw_": _adamw_cases(),
            "masked_adamw_capturable_": _adamw_capturable_cases(),
        },
        # the C++ kernels registered under the public names (TORCH_LIBRARY_IMPL(lass_sparse,
        # CPU)), run with their own checks only (testing.cpu_kernels: no Python body first)
        "cpu_kernels": {
            "pack_mask": _pack_cases(),
            "unpack_mask": _unpack_cases(),
            "magnitude_mask": _magnitude_cases(),
            "masked_cast": _cast_cases(),
            # the entries take what the op takes ([..., K] x, any strides): the op's cases
            "masked_linear": _linear_cases(),
            "masked_linear_dx": _dx_cases(),
            "masked_linear_dw": _dw_cases(),
            "segmented_masked_linear": _seg_cases() + [
                ("int32 offsets (the kernel takes int64)",
                 lambda: (*_seg_args()[:3], torch.tensor([0, 8], dtype=torch.int32),
                          torch.tensor([0]), None)),
                ("meta offsets", lambda: (*_seg_args()[:3], torch.tensor([0, 8], device="meta"),
                                          torch.tensor([0]), None))],
            "masked_linear_dw_accumulate_": _acc_cases(),
            "segmented_masked_linear_dx": _seg_grad_cases("dx") + _seg_kernel_cases("dx"),
            "segmented_masked_linear_dw": _seg_grad_cases("dw") + _seg_kernel_cases("dw"),
            "masked_qkv_proj": _qkv_cases(),
            "masked_adamw_": _adamw_cases() + [
                ("lr inf", lambda: (*_adamw_lists(torch.randn(4, 40)), math.inf, *_HP[1:])),
                ("beta1 = 1", lambda: (*_adamw_lists(torch.randn(4, 40)), 1e-3, 1.0,
                                       *_HP[2:]))],
        },
        "lass_sparse_cpu": {"masked_linear_autograd": _linear_cases(public=False),
                            "masked_qkv_autograd": _qkv_cases(),
                            "masked_cast_autograd": _cast_cases(),
                            "remember_table": _remember_cases(),
                            "table_known": [
                                ("offsets 2-D", lambda: (torch.zeros(2, 2, dtype=torch.long),
                                                         torch.zeros(1, dtype=torch.long), 4,
                                                         2)),
                                ("int offsets list", lambda: ([0, 4], [0], 4, 2)),
                                ("negative rows", lambda: (torch.tensor([0, 4]),
                                                           torch.tensor([0]), -1, 2))],
                            # takes no argument: one given is refused, not ignored
                            "amx_bf16": [("a tensor", lambda: (torch.zeros(2),))]},
        # The CUDA kernels (csrc/cuda/binding.cpp, TORCH_LIBRARY_IMPL(lass_sparse, CUDA)), run
        # with their own checks only (testing.cuda_kernels); the builders run only on CUDA
        # machines.
        "cuda_kernels": _cuda_cases() if torch.cuda.is_available() else {},
    }


def _cuda_cases():
    cuda = "cuda"
    return {
        "pack_mask": _pack_cases(cuda),
        "unpack_mask": _unpack_cases(cuda),
        "magnitude_mask": _magnitude_cases(cuda) + [
            ("alpha 1.5", lambda: (torch.randn(4, 40, device=cuda), 1.5)),
            ("float64 weight", lambda: (torch.randn(4, 40, device=cuda, dtype=torch.float64),
                                        0.5))],
        "masked_cast": _cast_cases(cuda) + [
            ("bf16 -> fp16 (no kernel)", lambda: (torch.randn(4, 40, device=cuda).bfloat16(),
                                                  _i32(4, 2).to(cuda), torch.float16)),
            ("bits on the CPU", lambda: (torch.randn(4, 40, device=cuda), _i32(4, 2),
                                         torch.bfloat16))],
        # the entry takes what the op takes ([..., K] x, any strides): the op's cases
        "masked_linear": _linear_cases(cuda) + [
            ("17 rows", lambda: (torch.randn(17, 64, device=cuda),
                                 torch.randn(8, 64, device=cuda),
                                 _i32(8, 2).to(cuda), None)),
            ("weight on the CPU", lambda: (torch.randn(4, 64, device=cuda), torch.randn(8, 64),
                                           _i32(8, 2).to(cuda), None))],
        # the cuBLAS route's entries (any strides, as the ops): the ops' cases; the QKV
        # projection's with B*T = 64 rows, where the route starts
        "masked_linear_dx": _dx_cases(cuda),
        "masked_linear_dw": _dw_cases(cuda),
        "masked_linear_dw_accumulate_": _acc_cases(cuda),
        "masked_qkv_proj": _qkv_cases(cuda, t=32),
        "segmented_masked_linear": _seg_cases(cuda, values=False) + [
            ("65 rows", lambda: (torch.randn(65, 64, device=cuda), torch.randn(8, 64, device=cuda),
                                 _i32(1, 8, 2).to(cuda), torch.tensor([0, 65], device=cuda),
                                 torch.tensor([0], device=cuda), None)),
            ("bank with no pair", lambda: (torch.randn(4, 64, device=cuda),
                                           torch.randn(8, 64, device=cuda),
                                           _i32(0, 8, 2).to(cuda),
                                           torch.tensor([0, 4], device=cuda),
                                           torch.tensor([0], device=cuda), None)),
            ("table on the CPU", lambda: (torch.randn(4, 64, device=cuda),
                                          torch.randn(8, 64, device=cuda),
                                          _i32(1, 8, 2).to(cuda), torch.tensor([0, 4]),
                                          torch.tensor([0]), None))],
        "masked_adamw_": _adamw_cases(cuda, public=False) + [
            ("exp_avg is exp_avg_sq", lambda: (lambda p, m: (
                [p], [torch.randn_like(p)], [m], [m], [None], *_HP))(
                    torch.randn(64, 64, device=cuda), torch.zeros(64, 64, device=cuda)))],
    }


def registered_ops(namespaces=NAMESPACES) -> dict[str, list[str]]:
    """Every op registered in our namespaces, from the dispatcher (not from a hand-kept list)."""
    out: dict[str, list[str]] = {}
    for full in torch._C._dispatch_get_all_op_names():
        ns, _, name = full.partition("::")
        if ns in namespaces:
            out.setdefault(ns, []).append(name.split(".")[0])
    return {ns: sorted(set(v)) for ns, v in out.items()}


def _run_cases() -> None:
    """Subprocess body: one line per case, flushed before the call (a signal names its case)."""
    cases = _cases()
    groups = [(ns, name, getattr(getattr(torch.ops, ns), name))
              for ns, names in registered_ops().items() for name in names]
    groups += [("cpu_kernels", name, getattr(cpu_kernels, name))
               for name in native_kernel_ops("cpu")]
    groups += [("cuda_kernels", name, getattr(cuda_kernels, name))
               for name in native_kernel_ops("cuda")]
    for ns, name, op in groups:
        todo = cases.get(ns, {}).get(name)
        if not todo:
            print(f"MISSING {ns}::{name}", flush=True)
            continue
        for label, build in todo:
            print(f"CASE {ns}::{name} [{label}]", flush=True)
            try:
                op(*build())
            except Exception as e:  # noqa: BLE001 - any Python exception is the pass
                msg = str(e).splitlines()[0][:160] if str(e) else ""
                print(f"RAISED {type(e).__name__}: {msg}", flush=True)
            else:
                print(f"NORAISE {ns}::{name} [{label}]", flush=True)
    print("END", flush=True)


def native_kernel_ops(backend: str) -> list[str]:
    """The public ops with a C++ kernel of ``backend`` (cpu: the CPU key, cuda: the CUDA key)
    registered, from the dispatcher; none where that backend is inactive."""
    if not lass_sparse.backends()[backend]["active"]:
        return []
    return [n for n in registered_ops(("lass_sparse",)).get("lass_sparse", [])
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"lass_sparse::{n}",
                                                              backend.upper())]



def test_every_registered_op_rejects_wrong_sizes_with_an_exception_not_a_signal():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                       text=True, timeout=600)
    out = r.stdout.splitlines()
    last = next((ln for ln in reversed(out) if ln.startswith("CASE")), "")
    assert r.returncode == 0, (f"died with {r.returncode} (negative: a signal) in {last}\n"
                               f"{r.stderr[-2000:]}")
    assert out and out[-1] == "END", r.stderr[-2000:]
    missing = [ln for ln in out if ln.startswith("MISSING")]
    assert not missing, f"registered ops without wrong-size cases: {missing}"
    noraise = [ln for ln in out if ln.startswith("NORAISE")]
    assert not noraise, f"calls with wrong sizes that did not raise: {noraise}"
    ns_seen = {ln.split()[1].split("::")[0] for ln in out if ln.startswith("CASE")}
    assert {"lass_sparse"} <= ns_seen
    if lass_sparse.backends()["cpu"]["active"]:
        assert {"lass_sparse_cpu", "cpu_kernels"} <= ns_seen
    if lass_sparse.backends()["cuda"]["active"]:
        assert "cuda_kernels" in ns_seen


def test_registered_ops_are_all_known():
    """The enumeration itself: every public op is there (and so is covered above)."""
    ops = registered_ops()
    assert {"masked_linear", "segmented_masked_linear_dw", "masked_adamw_"} <= set(
        ops["lass_sparse"])
    assert set(ops["lass_sparse"]) <= set(_cases()["lass_sparse"])


def test_issue_examples_raise_and_leave_params_alone():
    p = torch.randn(*_BIG)
    p0 = p.clone()
    if lass_sparse.backends()["cpu"]["active"]:
        with pytest.raises(RuntimeError, match=r"grads\[0\] must be"):
            cpu_kernels.masked_adamw_(
                [p], [torch.randn(1)], [torch.zeros_like(p)], [torch.zeros_like(p)], [None],
                1e-3, .9, .999, 1e-8, 0., 1, False)
        with pytest.raises(RuntimeError, match=r"bits must be Int\[4096, 128\]"):
            cpu_kernels.masked_linear_dw(torch.randn(8, 4096), torch.randn(8, 4096),
                                         _i32(4096, 1))
    with pytest.raises(ValueError, match=r"bits_bank must be int32\[1, 4096, 128\]"):
        torch.ops.lass_sparse.segmented_masked_linear_dw(
            torch.randn(8, 4096), torch.randn(8, 4096), _i32(1, 4096, 1), torch.tensor([0, 8]),
            torch.tensor([0]))
    assert torch.equal(p, p0)


def test_cupy_loader_checks_every_tensor_before_a_launch():
    """The cupy backend hands raw pointers to NVRTC kernels: its argument checks (device-agnostic
    host code, run here on CPU tensors) must refuse what the compiled binding refuses."""
    from lass_sparse.backends import _cuda_common as cc

    x, w, bits, b = torch.randn(3, 40), torch.randn(8, 40), _bits(8, 40), torch.randn(8)
    cc.check_gemv_args(x, w, bits, b)  # valid
    for args in ((x, w, _i32(8, 1), b), (x, w, _i32(1, 2), b), (x, w, bits.long(), b),
                 (x, w, bits, b[:1]), (x, w.double(), bits, b), (torch.randn(17, 40), w, bits, b),
                 (torch.randn(40, 3).t(), w, bits, b), (x.double(), w.double(), bits, None),
                 (x, torch.randn(8, 39), bits, None), (x, w, bits.to("meta"), None)):
        with pytest.raises((TypeError, ValueError)):
            cc.check_gemv_args(*args)
    p = torch.randn(4, 40)
    ok = ([p], [torch.randn(4, 40)], [torch.zeros(4, 40)], [torch.zeros(4, 40)], [_bits(4, 40)])
    cc.check_adamw_args(*ok)
    for i, bad in ((1, torch.randn(1)), (2, torch.zeros(1)), (3, torch.zeros(4, 40).double()),
                   (4, _i32(4, 1)), (0, torch.randn(40, 4).t())):
        args = [list(a) for a in ok]
        args[i][0] = bad
        with pytest.raises((TypeError, ValueError)):
            cc.check_adamw_args(*args)
    with pytest.raises(ValueError):
        cc.check_adamw_args([p], [], [], [], [])
    cc.check_pack_args(torch.ones(2, 40, dtype=torch.bool))
    cc.check_unpack_args(_i32(2, 2), 40)
    cc.check_magnitude_args(w)
    for fn, args in ((cc.check_pack_args, (torch.ones(2, 40),)),
                     (cc.check_unpack_args, (_i32(2, 1), 40)),
                     (cc.check_unpack_args, (_i32(2, 0), -3)),
                     (cc.check_magnitude_args, (torch.tensor(1.0),)),
                     (cc.check_magnitude_args, (w.double(),))):
        with pytest.raises((TypeError, ValueError)):
            fn(*args)


# --------------------------------------------------------------------- devices agree (item 2)


def _valid_samples() -> dict[str, tuple]:
    """One valid call per public op (small)."""
    x, w, bits, b = torch.randn(3, 40), torch.randn(8, 40), _bits(8, 40), torch.randn(8)
    bank = _bits(8, 40, lead=(2,))
    offs, pair = torch.tensor([0, 1, 3]), torch.tensor([1, 0])
    xq, wq, bq = torch.randn(1, 2, 8), torch.randn(24, 8), _bits(24, 8)
    p = torch.randn(4, 40)
    return {
        "pack_mask": (torch.rand(4, 40) > 0.5,),
        "unpack_mask": (bits, 40),
        "magnitude_mask": (w, 0.5),
        "masked_cast": (w, bits, torch.bfloat16),
        "masked_linear": (x, w, bits, b),
        "masked_linear_dx": (torch.randn(3, 8), w, bits),
        "masked_linear_dw": (torch.randn(3, 8), x, bits),
        "masked_linear_dw_accumulate_": (torch.zeros(8, 40), torch.randn(3, 8), x, bits),
        "segmented_masked_linear": (x, w, bank, offs, pair, b),
        "segmented_masked_linear_dx": (torch.randn(3, 8), w, bank, offs, pair),
        "segmented_masked_linear_dw": (torch.randn(3, 8), x, bank, offs, pair),
        "masked_qkv_proj": (xq, wq, bq, torch.randn(24), 2),
        "masked_adamw_": ([p], [torch.randn(4, 40)], [torch.zeros(4, 40)], [torch.zeros(4, 40)],
                          [_bits(4, 40)], *_HP),
        "masked_adamw_capturable_": ([p.clone()], [torch.randn(4, 40)], [torch.zeros(4, 40)],
                                     [torch.zeros(4, 40)], [_bits(4, 40)], [torch.ones(())],
                                     torch.tensor(1e-3), *_HP[1:5], False),
    }


def _tensor_slots(args):
    """(path, tensor) for every tensor argument, list elements included."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            yield (i, None), a
        elif isinstance(a, list):
            for j, t in enumerate(a):
                if isinstance(t, torch.Tensor):
                    yield (i, j), t


def _with(args, slot, value):
    args = [list(a) if isinstance(a, list) else a for a in args]
    i, j = slot
    if j is None:
        args[i] = value
    else:
        args[i][j] = value
    return args


def test_valid_samples_cover_every_public_op():
    assert set(_valid_samples()) == set(registered_ops(("lass_sparse",))["lass_sparse"])


@pytest.mark.parametrize("op", sorted(_valid_samples()))
def test_one_meta_argument_is_rejected_naming_it(op):
    """A meta tensor among CPU tensors: the fake kernel must not run (it would hand back an
    uninitialised CPU tensor, or do nothing for an in-place op) and no CPU kernel reads it."""
    args = _valid_samples()[op]
    slots = list(_tensor_slots(args))
    if len(slots) < 2:
        pytest.skip("one tensor argument: nothing to disagree with")
    fn = getattr(torch.ops.lass_sparse, op)
    for slot, t in slots:
        fresh = _valid_samples()[op]
        before = [a.clone() if isinstance(a, torch.Tensor) else [u.clone() for u in a]
                  for a in fresh if isinstance(a, (torch.Tensor, list))]
        with pytest.raises(ValueError, match="one device.*meta"):
            fn(*_with(fresh, slot, t.to("meta")))
        after = [a if isinstance(a, torch.Tensor) else list(a) for a in fresh
                 if isinstance(a, (torch.Tensor, list))]
        for a, b in zip(before, after):  # in-place ops wrote nothing
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
            else:
                assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("op", sorted(_valid_samples()))
def test_all_meta_arguments_give_meta_shapes(op):
    args = [a.to("meta") if isinstance(a, torch.Tensor) else
            [t.to("meta") if isinstance(t, torch.Tensor) else t for t in a]
            if isinstance(a, list) else a for a in _valid_samples()[op]]
    out = getattr(torch.ops.lass_sparse, op)(*args)
    real = getattr(torch.ops.lass_sparse, op)(*_valid_samples()[op])
    outs, reals = (out, real) if isinstance(out, tuple) else ((out,), (real,))
    for o, r in zip(outs, reals):
        if o is None:
            assert r is None
            continue
        assert o.device.type == "meta" and o.shape == r.shape and o.dtype == r.dtype


def test_issue_meta_examples():
    x, w, bank = torch.randn(3, 40), torch.randn(8, 40), _bits(8, 40, lead=(2,))
    offs, pair = torch.tensor([0, 3]), torch.tensor([0])
    with pytest.raises(ValueError, match="seg_offsets is on meta"):
        lass_sparse.segmented_masked_linear(x, w, bank, offs.to("meta"), pair.to("meta"))
    with pytest.raises(ValueError, match="bits is on meta"):
        lass_sparse.masked_qkv_proj(torch.randn(1, 2, 8), torch.randn(24, 8),
                                    _bits(24, 8).to("meta"), None, 2)
    p = torch.randn(4, 40)
    p0 = p.clone()
    for kw in ({"bits": [_bits(4, 40).to("meta")]},
               {"grads": [torch.randn(4, 40, device="meta")]}):
        args = dict(grads=[torch.randn(4, 40)], bits=[None]) | kw
        with pytest.raises(ValueError, match="is on meta"):
            lass_sparse.masked_adamw_([p], args["grads"], [torch.zeros(4, 40)],
                                      [torch.zeros(4, 40)], args["bits"], lr=1e-3, step=1)
    assert torch.equal(p, p0)


# -------------------------------------------------------------- non-finite contract (item 5)


def _nonfinite_case(n=12, k=45, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    mask = torch.rand(n, k, generator=g) < 0.5
    return x, w, mask, pack_mask_reference(mask)


def _poison(t, keep, values=(math.nan, math.inf, -math.inf)):
    """``t`` with its off-mask entries set to NaN / +Inf / -Inf in turn."""
    t = t.clone()
    idx = (~keep).nonzero(as_tuple=True)
    vals = torch.tensor(values, dtype=t.dtype).repeat(idx[0].numel() // len(values) + 1)
    t[idx] = vals[: idx[0].numel()]
    return t


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("m", [3, 20])  # cpu: decode GEMV and the tiled BLAS path
def test_nonfinite_off_mask_weight_is_not_used(backend, m):
    x, w, mask, bits = _nonfinite_case(m=m)
    clean = torch.where(mask, w, 0.0)
    bad = _poison(w, mask)
    b = torch.randn(w.shape[0])
    with lass_sparse.use_backend(backend):
        xg, wg = x.clone().requires_grad_(), bad.clone().requires_grad_()
        y = lass_sparse.masked_linear(xg, wg, bits, b)
        y.backward(torch.ones_like(y))
        bank = torch.stack([bits, bits])
        ys = lass_sparse.segmented_masked_linear(x, bad, bank, torch.tensor([0, 2, m]),
                                                 torch.tensor([1, 0]))
    want = torch.nn.functional.linear(x, clean, b)
    assert torch.isfinite(y).all() and torch.isfinite(ys).all()
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ys, want - b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xg.grad, torch.ones(m, w.shape[0]) @ clean, atol=1e-4, rtol=1e-4)
    assert torch.equal(wg.grad[~mask], torch.zeros(int((~mask).sum())))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["x", "grad_out"])
def test_off_mask_dw_is_exactly_zero_with_nonfinite_x_or_grad(backend, where):
    x, w, mask, bits = _nonfinite_case(m=6)
    dy = torch.randn(6, w.shape[0])
    if where == "x":
        x[0, :] = math.inf
        x[1, 3] = math.nan
    else:
        dy[2, :] = -math.inf
        dy[3, 1] = math.nan
    with lass_sparse.use_backend(backend):
        dw = torch.ops.lass_sparse.masked_linear_dw(dy, x, bits)
        acc = torch.full(w.shape, 7.0)
        torch.ops.lass_sparse.masked_linear_dw_accumulate_(acc, dy, x, bits)
        sdw = torch.ops.lass_sparse.segmented_masked_linear_dw(
            dy, x, torch.stack([bits, bits]), torch.tensor([0, 4, 6]), torch.tensor([0, 1]))
    off = ~mask
    assert torch.equal(dw[off], torch.zeros(int(off.sum())))
    assert torch.equal(sdw[off], torch.zeros(int(off.sum())))
    assert torch.equal(acc[off], torch.full((int(off.sum()),), 7.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_nonfinite_off_mask_grad_leaves_state_alone(backend):
    p = torch.randn(4, 40)
    mask = torch.rand(4, 40) < 0.5
    g = _poison(torch.randn(4, 40), mask)
    m, v = torch.zeros(4, 40), torch.zeros(4, 40)
    p0 = p.clone()
    with lass_sparse.use_backend(backend):
        lass_sparse.masked_adamw_([p], [g], [m], [v], [pack_mask_reference(mask)], lr=1e-2,
                                  step=1)
    assert torch.equal(p[~mask], p0[~mask]) and torch.all(m[~mask] == 0)
    assert torch.isfinite(p).all() and not torch.equal(p[mask], p0[mask])


# ------------------------------------------------------------------- zero-size shapes (item 7)


ZERO_SHAPES = [  # (lead dims of x, N, K)
    ((3,), 5, 0), ((2, 3), 5, 0), ((3,), 0, 40), ((0,), 5, 40), ((0,), 0, 0), ((2, 0), 5, 33),
    ((0, 4), 0, 7),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("lead,n,k", ZERO_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_zero_size_shapes_behave_like_f_linear(backend, lead, n, k, bias):
    x = torch.randn(*lead, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    b = torch.randn(n, requires_grad=True) if bias else None
    bits = pack_mask_reference(torch.ones(n, k, dtype=torch.bool))
    with lass_sparse.use_backend(backend):
        y = lass_sparse.masked_linear(x, w, bits, b)
        y.backward(torch.ones_like(y))
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    br = None if b is None else b.detach().clone().requires_grad_()
    yr = torch.nn.functional.linear(xr, wr, br)
    yr.backward(torch.ones_like(yr))
    assert y.shape == yr.shape
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)
    if bias:
        torch.testing.assert_close(b.grad, br.grad)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bsz,t", [(2, 0), (0, 3), (0, 0)])
def test_qkv_proj_with_zero_batch_or_time(backend, bsz, t):
    d, h = 8, 2
    x = torch.randn(bsz, t, d, requires_grad=True)
    w = torch.randn(3 * d, d, requires_grad=True)
    bias = torch.randn(3 * d, requires_grad=True)
    with lass_sparse.use_backend(backend):
        q, k, v = lass_sparse.masked_qkv_proj(x, w, _bits(3 * d, d), bias, h)
        (q.sum() + k.sum() + v.sum()).backward()
    for o in (q, k, v):
        assert o.shape == (bsz, h, t, d // h)
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_segmented_with_zero_rows_and_zero_k(backend):
    with lass_sparse.use_backend(backend):
        for t, n, k in ((0, 5, 40), (4, 5, 0), (4, 0, 40)):
            x = torch.randn(t, k, requires_grad=True)
            w = torch.randn(n, k, requires_grad=True)
            bank = _bits(n, k, lead=(2,))
            offs = torch.tensor([0, t // 2, t])
            y = lass_sparse.segmented_masked_linear(x, w, bank, offs, torch.tensor([1, 0]))
            y.sum().backward()
            assert y.shape == (t, n) and torch.equal(y, torch.zeros(t, n))
            assert x.grad.shape == x.shape and w.grad.shape == w.shape


# ------------------------------------------------------------- forced backend, dtype (item 8)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend not built")
def test_forced_cpu_backend_names_the_dtype_it_cannot_run(monkeypatch):
    x, w, bits = torch.randn(3, 40).half(), torch.randn(8, 40).half(), _bits(8, 40)
    want = (r"backend cpu does not support float16 for masked_linear; supported: float32, "
            r"float64 or bfloat16")
    with lass_sparse.use_backend("cpu"):
        with pytest.raises(_registry.BackendCannotServe, match=want):
            lass_sparse.masked_linear(x, w, bits)
        p = torch.randn(4, 40, dtype=torch.float64)
        with pytest.raises(_registry.BackendCannotServe,
                           match="does not support float64 for masked_adamw_; supported: "
                                 "float32 or bfloat16"):
            lass_sparse.masked_adamw_([p], [torch.randn_like(p)], [torch.zeros(4, 40)],
                                      [torch.zeros(4, 40)], [None], lr=1e-3, step=1)
    monkeypatch.setenv(_registry.ENV_VAR, "cpu")
    with pytest.raises(_registry.BackendCannotServe, match=want):
        lass_sparse.masked_linear(x, w, bits)
    monkeypatch.delenv(_registry.ENV_VAR)
    # unforced, fp16 falls through to the reference
    y = lass_sparse.masked_linear(x, w, bits)
    assert y.dtype == torch.float16 and y.shape == (3, 8)


# ------------------------------------------------------------------ optimizer arguments (item 9)


def _adamw_call(backend, p, g, m, v, **kw):
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1) | kw
    with lass_sparse.use_backend(backend):
        lass_sparse.masked_adamw_(p, g, m, v, [None] * len(p), **hp)


BAD_HYPER = [
    (dict(lr=math.nan), "learning rate"), (dict(lr=math.inf), "learning rate"),
    (dict(lr=-1e-3), "learning rate"), (dict(beta1=1.0), "beta1"), (dict(beta1=-0.1), "beta1"),
    (dict(beta2=1.0), "beta2"), (dict(beta2=math.nan), "beta2"), (dict(eps=-1e-8), "epsilon"),
    (dict(eps=math.nan), "epsilon"), (dict(weight_decay=math.nan), "weight_decay"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(step=0), "step must be"),
    (dict(step=-1), "step must be"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw,match", BAD_HYPER)
def test_masked_adamw_rejects_bad_hyperparameters(backend, kw, match):
    p = torch.randn(4, 40)
    p0 = p.clone()
    m, v = torch.zeros(4, 40), torch.zeros(4, 40)
    with pytest.raises(ValueError, match=match):
        _adamw_call(backend, [p], [torch.randn(4, 40)], [m], [v], **kw)
    assert torch.equal(p, p0) and not m.any() and not v.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_adamw_rejects_duplicates_and_aliased_state(backend):
    p, q = torch.randn(4, 40), torch.randn(4, 40)
    p0 = p.clone()
    z = lambda: torch.zeros(4, 40)  # noqa: E731
    g = torch.randn(4, 40)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        _adamw_call(backend, [p, p], [g, g], [z(), z()], [z(), z()])
    m = z()
    with pytest.raises(ValueError, match="share memory"):
        _adamw_call(backend, [p], [g], [m], [m])  # exp_avg is exp_avg_sq
    big = torch.zeros(8, 40)
    with pytest.raises(ValueError, match="share memory"):  # overlapping views
        _adamw_call(backend, [p, q], [g, g], [big[:4], big[2:6]], [z(), z()])
    with pytest.raises(ValueError, match="share memory"):
        _adamw_call(backend, [p], [p], [z()], [z()])  # grad aliasing the param it updates
    assert torch.equal(p, p0)
    # a grad shared by two params (read only) and masks shared by two params are fine
    _adamw_call(backend, [p, q], [g, g], [z(), z()], [z(), z()])


def test_masked_adamw_class_validates_like_torch_optim():
    w = torch.nn.Parameter(torch.randn(4, 40))
    for kw in (dict(lr=math.nan), dict(lr=-1.0), dict(betas=(1.0, 0.999)),
               dict(betas=(0.9, math.nan)), dict(eps=-1e-8), dict(weight_decay=math.nan)):
        with pytest.raises(ValueError, match="invalid"):
            MaskedAdamW([w], **kw)
    with pytest.raises(ValueError, match="same parameter twice"):
        MaskedAdamW([w, w])
    with pytest.raises(ValueError, match="invalid learning rate"):
        MaskedAdamW([w]).add_param_group({"params": [torch.nn.Parameter(torch.randn(3))],
                                          "lr": math.nan})
    # a scheduler (or a user) setting a NaN lr later is caught at step time, before any update
    opt = MaskedAdamW([w], lr=1e-3)
    w.grad = torch.randn(4, 40)
    opt.param_groups[0]["lr"] = math.nan
    w0 = w.detach().clone()
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    assert torch.equal(w.detach(), w0)


def test_reference_adamw_with_step_zero_is_a_clear_error_not_zero_division():
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        _adamw_call("reference", [torch.randn(3)], [torch.randn(3)], [torch.zeros(3)],
                    [torch.zeros(3)], step=0)


def test_unpack_reference_helper_still_rejects_bad_words():
    with pytest.raises(ValueError):
        unpack_mask_reference(_i32(2, 1), 40)


if __name__ == "__main__":
    _run_cases()
