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
# ``make bench-gpu`` / tools/gpu_check.py run ``gpu``; CI skips them where no GPU exists).
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


def amp_layer_step(impl: str, x, w32, mask, bits):
    """One layer's forward + backward under bf16 autocast with fp32 master weights (how the CLI
    trains on a GPU), on x's device: ours, the masked modules' route (masked_cast: W ⊙ M in
    autocast's cast of W, then F.linear); ours_fused, the route it replaced (autocast's cast of
    W, then masked_linear); dense, autocast's F.linear; naive, F.linear of the bool-masked
    weight. The step returns W's (fp32) grad."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape[0], w32.shape[0], generator=g).to(x.device, torch.bfloat16)
    xg, wg = x.detach().requires_grad_(True), w32.detach().requires_grad_(True)
    bf16 = torch.bfloat16
    fwd = {"ours": lambda: F.linear(xg, ls.masked_cast(wg, bits, bf16)),
           "ours_fused": lambda: ls.masked_linear(xg.to(bf16), wg.to(bf16), bits),
           "dense": lambda: F.linear(xg, wg),
           "naive": lambda: F.linear(xg, wg * mask)}[impl]

    def step():
        xg.grad = wg.grad = None
        with torch.autocast(x.device.type, dtype=bf16):
            y = fwd()
        y.backward(dy)
        return wg.grad

    return step


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


# ------------------------------------------------------------------------------ device time
# Issue 29's GPU measurements: device time (CUDA events over back-to-back calls, and CUDA-graph
# replay) beside the eager per-call time, achieved TFLOP/s and TB/s as a share of the device's
# peaks measured in the same run (bf16 8192³ torch.mm; a device-to-device copy).

DEVICE_SHAPES = [(4096, 4096), (4096, 1024), (1024, 4096), (8192, 8192)]  # (N, K)
DEVICE_M = [1, 4, 16, 64, 256, 1024, 4096, 8192]
BANDWIDTH_SHAPES = {(8192, 8192)}  # measured at decode rows only: a bandwidth case
BANDWIDTH_MAX_M = 16
SMOKE_DEVICE_CASES = [((1024, 4096), 16), ((4096, 1024), 256)]
DEVICE_CALLS = 200  # back-to-back calls per device-time measurement (issue 29: >= 200)
JOINT_PAIRS = [1, 8, 32]  # pairs resident in the peak-memory benchmark of joint training


def device_cases(smoke: bool = False) -> list[tuple[tuple[int, int], int]]:
    """The ((N, K), M) cases of the device sweep: every M of DEVICE_M on the GEMM shapes, the
    bandwidth shapes (8192²) at M <= BANDWIDTH_MAX_M only; SMOKE_DEVICE_CASES in smoke runs."""
    if smoke:
        return list(SMOKE_DEVICE_CASES)
    return [(s, m) for s in DEVICE_SHAPES for m in DEVICE_M
            if s not in BANDWIDTH_SHAPES or m <= BANDWIDTH_MAX_M]


# Issue 29's sweep on a lent GPU runs under a time budget (LASS_SPARSE_BENCH_BUDGET_S, conftest):
# with LASS_SPARSE_SWEEP_PRIORITY=1 the cases run most-telling first, each case's impls together
# (baselines first), so a budget cut leaves whole rows, not "ours" without its "dense".
SWEEP_KEY_CASES = ([((4096, 4096), m) for m in (4096, 256, 1024, 64)]
                   + [((8192, 8192), 1), ((8192, 8192), 16)])
SWEEP_IMPL_ORDER = ("dense", "naive", "ours", "ours_fused", "ours_keep_wm", "ours_wt",
                    "ours_wt_persistent", "ours_wt_tma", "ours_gemv2", "ours_gemv3",
                    "ours_no_small", "ours_small64", "ours_triton", "plain_compiled", "plain",
                    "ours_compiled")


def sweep_priority(test: str, params: dict, index: int) -> tuple:
    """Sort key of one collected device-time benchmark (``test``: the function's name, ``params``
    its parametrization, ``index``: its place in collection order). Tiers: 0 the key cases'
    forward and fwd+bwd, 1 the segmented cases then the training throughput, 2 other forward /
    fwd+bwd, 3 dx and dW, 4 the rest (joint-training memory); within a tier the cases in
    order, impls by SWEEP_IMPL_ORDER."""
    impl = params.get("impl", "")
    rank = SWEEP_IMPL_ORDER.index(impl) if impl in SWEEP_IMPL_ORDER else len(SWEEP_IMPL_ORDER)
    if test == "test_linear_device_time":
        op, case = params["op"], params["case"]
        main = op in ("fwd", "fwd_bwd")
        if main and case in SWEEP_KEY_CASES:
            return (0, SWEEP_KEY_CASES.index(case), op, rank, index)
        return (2 if main else 3, 0, f"{op} {case_id(case)}", rank, index)
    if test == "test_segmented_device_time":
        return (1, 0, f"{params['op']} {params['nk']}", rank, index)
    if test == "test_segmented_decode_device_time":  # the server's decode, after the above
        return (1, 1, f"decode {params['t']} {params['nk']}", rank, index)
    if test == "test_amp_layer_device_time":  # the CLI's training precision, with the above
        return (1, 2, case_id(params["case"]), rank, index)
    if test == "test_train_throughput":  # after the segmented cases; ours compiled (a minute
        # or two of compiling) with the rest
        return (4 if impl == "ours_compiled" else 1, 1, "", rank, index)
    return (4, 0, "", rank, index)


def case_id(case: tuple[tuple[int, int], int]) -> str:
    (n, k), m = case
    return f"{n}x{k}-M{m}"


def linear_cost(op: str, m: int, n: int, k: int, elt: int, masked: bool = True) -> tuple[int, int]:
    """(flop, bytes) of ``op`` for x [M, K], W [N, K] with ``elt``-byte elements: the least
    traffic a kernel can have, every operand read once and the result written once (the packed
    mask, 1 bit per weight, when ``masked``). ``op``: ``fwd`` (y = x Wᵀ), ``dx`` (dy W),
    ``dw`` ((dyᵀ x) ⊙ M), ``fwd_bwd`` (all three: W, x and dy read once each, y, dx, dW written;
    the mask read once per pass)."""
    mask = n * ((k + 31) // 32) * 4 if masked else 0
    x, w, y = m * k * elt, n * k * elt, m * n * elt
    table = {
        "fwd": (2 * m * n * k, x + w + mask + y),
        "dx": (2 * m * n * k, y + w + mask + x),
        "dw": (2 * m * n * k, y + x + mask + w),
        "fwd_bwd": (6 * m * n * k, 2 * x + 2 * w + 3 * mask + 2 * y),
    }
    if op not in table:
        raise ValueError(f"linear_cost: op must be one of {sorted(table)}, got {op!r}")
    return table[op]


def achieved(flop: float, nbytes: float, seconds: float) -> tuple[float, float]:
    """(TFLOP/s, TB/s) of ``flop`` and ``nbytes`` in ``seconds``."""
    if not seconds > 0:
        raise ValueError(f"achieved: seconds must be > 0, got {seconds}")
    return flop / seconds / 1e12, nbytes / seconds / 1e12


def share(value: float, peak: float | None) -> float | None:
    """``value`` as a fraction of ``peak`` (None when no peak was measured)."""
    return None if not peak else value / peak


def mask_budget_bytes(weights: int, pairs: int) -> int:
    """What ``pairs`` packed masks of ``weights`` masked weights may add: 1 bit per weight per
    pair (issue 29: ours <= dense + P x (1 bit/weight) + one layer's workspace)."""
    return pairs * ((weights + 7) // 8)


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} measures CUDA device time: it needs a CUDA GPU")


def device_time(fn, *args, calls: int = DEVICE_CALLS, warmup: int = 3) -> float:
    """Seconds per call on the device: CUDA events around ``calls`` back-to-back calls with no
    synchronisation between them (the GPU's queue stays full unless the host cannot keep up:
    then this is the host's launch rate, and graph_time tells the two apart)."""
    _require_cuda("device_time")
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn(*args)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def graph_time(fn, *args, calls: int = DEVICE_CALLS, warmup: int = 3) -> float | None:
    """Seconds per call replaying one call captured in a CUDA graph ``calls`` times (no host
    work in the loop: pure device time); None when ``fn`` cannot be captured (a host sync,
    ``.tolist()``, a CPU tensor)."""
    _require_cuda("graph_time")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(s):
            for _ in range(warmup):
                fn(*args)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*args)
    except Exception:  # noqa: BLE001 - not capturable: reported as "—"
        torch.cuda.synchronize()
        return None
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def eager_time(fn, *args, calls: int = 20, device: str = "cuda") -> float:
    """Median seconds of one call as a user's eager loop sees it: host work, launches and the
    kernels, synchronised after each call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn(*args)
    sync()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


class Peaks:
    """The device's measured peaks, once per run: ``tflops`` of a bf16 ``n³`` torch.mm and
    ``tbps`` of a device-to-device copy (bytes read + written)."""

    def __init__(self, tflops: float, tbps: float, name: str = ""):
        self.tflops, self.tbps, self.name = tflops, tbps, name

    @classmethod
    def measure(cls, n: int = 8192, copy_bytes: int = 2**30, calls: int = 50) -> Peaks:
        _require_cuda("Peaks.measure")

        def mm_time() -> float:
            a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
            return device_time(lambda a, b, o: torch.mm(a, b, out=o), a, b, out, calls=calls)

        def copy_time() -> float:
            src = torch.empty(copy_bytes // 4, device="cuda", dtype=torch.float32).normal_()
            return device_time(torch.Tensor.copy_, torch.empty_like(src), src, calls=calls)

        t_mm, t_copy = mm_time(), copy_time()
        torch.cuda.empty_cache()
        return cls(2 * n**3 / t_mm / 1e12, 2 * copy_bytes / t_copy / 1e12,
                   torch.cuda.get_device_name())

    def info(self) -> dict[str, str]:
        return {"peak_TFLOP/s": f"{self.tflops:.0f}", "peak_TB/s": f"{self.tbps:.2f}"}


def record_device(benchmark, fn, *args, flop: float, nbytes: float, peaks: Peaks | None,
                  calls: int = DEVICE_CALLS, graph: bool = True) -> dict[str, str]:
    """Measure ``fn(*args)`` on the GPU and put the device-time columns into ``extra_info``
    (report.py renders them): device_us (events, back-to-back), graph_us (CUDA-graph replay),
    eager_us (synchronised per call; also what pytest-benchmark's rounds time), achieved
    TFLOP/s and TB/s from the device time and their shares of the run's peaks."""
    t_dev = device_time(fn, *args, calls=calls)
    t_graph = graph_time(fn, *args, calls=calls) if graph else None
    t_eager = eager_time(fn, *args)
    best = min(t for t in (t_dev, t_graph) if t is not None)
    tflops, tbps = achieved(flop, nbytes, best)
    row = device_columns(t_dev, t_graph, t_eager, tflops, tbps, peaks)
    benchmark.extra_info.update(row)
    benchmark.extra_info["device_s"] = best
    if peaks is not None:
        benchmark.extra_info.update(peaks.info())

    def synced(*a):  # pytest-benchmark's rounds: one call each, synchronised (eager time)
        out = fn(*a)
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(synced, args=args, rounds=10, iterations=1, warmup_rounds=1)
    return row


def device_columns(t_dev: float, t_graph: float | None, t_eager: float, tflops: float,
                   tbps: float, peaks: Peaks | None) -> dict[str, str]:
    """The text cells of one device-time row (see record_device)."""
    pct_f = share(tflops, peaks.tflops if peaks else None)
    pct_b = share(tbps, peaks.tbps if peaks else None)
    return {
        "device_us": f"{t_dev * 1e6:.1f}",
        "graph_us": "—" if t_graph is None else f"{t_graph * 1e6:.1f}",
        "eager_us": f"{t_eager * 1e6:.1f}",
        "TFLOP/s": f"{tflops:.1f}" + ("" if pct_f is None else f" ({pct_f:.0%})"),
        "TB/s": f"{tbps:.2f}" + ("" if pct_b is None else f" ({pct_b:.0%})"),
    }
