"""Shared helpers for the benchmark suites: shapes, inputs, the baselines, and result tagging."""

from __future__ import annotations

import math
import time

import pytest
import torch

import lass_sparse as ls

# (N, K) weight shapes: Transformer-base FFN (512x2048, 2048x512), -big FFN (1024x4096), 4096^2.
FULL_SHAPES = [(2048, 512), (512, 2048), (4096, 1024), (4096, 4096)]
SMOKE_SHAPES = [(96, 200)]  # K not a multiple of 32
FULL_M = [1, 4, 16, 512]
GPU_M = [1, 16, 64, 256, 4096]  # a GPU training batch is thousands of tokens
SMOKE_M = [1, 17]
# ``device`` parameter: CUDA cases carry the ``gpu`` marker (``make bench`` runs ``not gpu``,
# ``make bench-gpu`` / scripts/gpu_check.py run ``gpu``; CI skips them where no GPU exists).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
KEEP = 0.3  # fraction of weights a pair keeps (alpha = 0.7), a typical LaSS sparsity


def tag(benchmark, op: str, impl: str, **case) -> None:
    """Record what a benchmark measured so report.py can line up ours/dense/naive per case."""
    benchmark.group = op + "[" + " ".join(f"{k}={v}" for k, v in case.items()) + "]"
    benchmark.extra_info.update(op=op, impl=impl, **{k: str(v) for k, v in case.items()})


def timed(benchmark, device: str, fn, *args):
    """``benchmark(fn, *args)`` after two warm-up calls (first-call set-up: allocations, thread
    pools, lazy registration; on CUDA also JIT compiles and autotuning), so pytest-benchmark
    calibrates its rounds on a warm function: without them a slow first call gave one
    implementation 5 rounds and another 300 (median 0.91 vs 0.63 ms for the same step). On CUDA
    a synchronize runs inside every round, so a round is the kernels' time, not the launch's."""
    if device != "cuda":
        fn(*args)
        fn(*args)
        return benchmark(fn, *args)

    def synced(*a):
        out = fn(*a)
        torch.cuda.synchronize()
        return out

    synced(*args)
    synced(*args)
    return benchmark(synced, *args)


PAIRED = "paired ours/dense"


def paired(benchmark, device: str, ours, dense, *, smoke: bool = False, seconds: float = 1.5,
           min_pairs: int = 9, label: str = PAIRED) -> float:
    """ours/dense from calls alternated in this test (the first of each pair alternating too):
    the median of the per-pair time ratios, recorded in ``extra_info[label]`` as
    ``"1.04× (0.98–1.10)"``: median (quartiles). pytest-benchmark times ours and dense in
    separate tests, seconds apart, and on a shared machine the load of its neighbours moves the
    two medians apart (by up to ±0.15 here between runs); within a pair it barely moves. Both
    calls must be warm; on CUDA each call is synchronized. ``smoke``: one pair (CI)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def clock(f) -> float:
        t0 = time.perf_counter()
        f()
        sync()
        return time.perf_counter() - t0

    ratios: list[float] = []
    t_end = time.perf_counter() + (0 if smoke else seconds)
    while len(ratios) < (1 if smoke else min_pairs) or time.perf_counter() < t_end:
        if len(ratios) % 2:
            d, o = clock(dense), clock(ours)
        else:
            o, d = clock(ours), clock(dense)
        ratios.append(o / d)
    ratios.sort()
    q = len(ratios) - 1
    med, lo, hi = ratios[q // 2], ratios[q // 4], ratios[(3 * q) // 4]
    assert math.isfinite(med) and med > 0, f"paired ratio {med}"
    benchmark.extra_info[label] = f"{med:.2f}× ({lo:.2f}–{hi:.2f})"
    return med


def inputs(m: int, n: int, k: int, dtype: torch.dtype, device="cpu", keep: float = KEEP):
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device) / k**0.5
    mask = torch.rand(n, k, device=device) < keep
    bits = ls.pack_mask(mask)
    return x, w, mask, bits


def linear_impls(w: torch.Tensor, mask: torch.Tensor, bits: torch.Tensor):
    """name -> f(x): ours (fused), dense (no mask), naive (LaSS original: bool mask, x @ (W*M).T),
    unpack (bits -> transient W*M -> BLAS)."""
    k = w.shape[1]
    return {
        "ours": lambda x: ls.masked_linear(x, w, bits),
        "dense": lambda x: torch.nn.functional.linear(x, w),
        "naive": lambda x: x @ (w * mask).T,
        "unpack": lambda x: torch.nn.functional.linear(x, w * ls.unpack_mask(bits, k)),
    }


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 1e-4 if out.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


class TensorMemory:
    """Peak bytes of CPU tensor storages created while active (a TorchDispatchMode): what
    "tracked tensor bytes" means in the CPU results. Storages are counted once and released when
    the tensor that created them dies (views outliving it make this a slight underestimate);
    buffers internal to C++ kernels are not seen."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._alive: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._alive.pop(key, 0)

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key not in tracker._alive:
                            tracker._alive[key] = st.nbytes()
                            tracker.live += st.nbytes()
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(t, tracker._release, key)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


def adamw_stepper(impl: str, ps: list, gs: list, masks: list, device):
    """(step, params) of one optimizer step over ``ps`` with grads ``gs``:

    - ``ours``: one ``masked_adamw_`` call (fp32 state whatever the param dtype);
    - ``dense``: ``torch.optim.AdamW(foreach=True)`` on the params (state in their dtype);
    - ``dense32``: the same on fp32 master copies (fp32 state, what ours keeps for bf16
      params), grads cast in and the result cast back into the params;
    - ``naive``: dense AdamW, then off-mask p, exp_avg, exp_avg_sq restored from bool masks
      (the original LaSS code's way).
    ``params`` are the tensors whose values the step changes (to check masks afterwards)."""
    if impl == "ours":
        bits = [ls.pack_mask(m) for m in masks]
        ms = [torch.zeros(p.shape, device=device) for p in ps]
        vs = [torch.zeros(p.shape, device=device) for p in ps]
        state = {"step": 0}

        def step():
            state["step"] += 1
            ls.masked_adamw_(ps, gs, ms, vs, bits, lr=1e-3, step=state["step"])

        return step, ps
    if impl == "dense32":
        master = [torch.nn.Parameter(p.float()) for p in ps]
        opt = torch.optim.AdamW(master, lr=1e-3, foreach=True)

        def step():
            for w, g in zip(master, gs):
                w.grad = g.float()
            opt.step()
            with torch.no_grad():
                torch._foreach_copy_(ps, master)

        return step, ps
    params = [torch.nn.Parameter(p) for p in ps]
    for p, g in zip(params, gs):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if impl == "dense":
        return opt.step, params

    def naive():
        old = [(p.detach().clone(), opt.state[p].get("exp_avg"), opt.state[p].get("exp_avg_sq"))
               for p in params]
        opt.step()
        with torch.no_grad():
            for p, m, (p0, m0, v0) in zip(params, masks, old):
                p.copy_(torch.where(m, p, p0))
                st = opt.state[p]
                if m0 is not None:
                    st["exp_avg"].copy_(torch.where(m, st["exp_avg"], m0))
                    st["exp_avg_sq"].copy_(torch.where(m, st["exp_avg_sq"], v0))

    return naive, params
