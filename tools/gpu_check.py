"""The GPU check: everything a lent GPU should run, in one command (``make gpu-check``).

    python tools/gpu_check.py [--out DIR] [--skip-build] [--skip-pytest] [--skip-bench]
    python tools/gpu_check.py --device cpu --dry --out DIR     # the case list on CPU (CI)

On a CUDA machine it
1. builds and installs the package (``pip install --no-build-isolation --no-deps -e .`` against
   the installed torch, ``TORCH_CUDA_ARCH_LIST`` default 9.0), unless ``--skip-build``;
2. prints ``lass_sparse.backends()``;
3. runs every public op (pack_mask, unpack_mask, magnitude_mask, masked_linear forward and
   backward, segmented_masked_linear forward and backward, masked_qkv_proj forward and backward,
   masked_cast and its gradient,
   masked_adamw_), the nn modules (MaskedLinear, MaskedMultiheadAttention with an attached
   MaskBank) and MaskedAdamW under every active GPU backend (forced with ``use_backend``)
   against the reference backend, per dtype (float32 IEEE, float32 with TF32 allowed, bfloat16,
   float16), each case in its own try/except, and writes the pass/fail table to
   ``DIR/gpu_check.md``;
4. runs ``pytest -m "gpu or triton"`` (compiled Triton kernels, the cuda/cupy tests) into
   ``DIR/pytest.log`` and the GPU benchmarks (``make bench-gpu``) into ``DIR/bench-gpu.json`` /
   ``.md`` (log: ``DIR/bench.log``);
5. runs the CLI pipeline on the GPU (``tools/gpu_pipeline_check.sh``: base, fine-tune, prune,
   joint, evaluate) into ``DIR/pipeline.log`` and ``tools/profile_step.py`` (where a joint
   step's host and device time go) into ``DIR/profile.txt``.

Eight files at most come back from a lent machine: these are the eight.

Results go to ``--out`` (default ``$OUT`` if set, else ``gpu_check_results/``). Exit status: 0
when every step and case passed, 1 when any failed (the table is written anyway), 2 when no
CUDA device exists (unless ``--device cpu``). Values use the flash-attention tolerance rule:
our error against a float64 result is at most twice torch's own error in the same dtype and
precision mode, plus a small floor.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_BACKENDS = ("cuda", "triton", "cupy")
# Issue 29's selectable kernels, checked beside the default ones on a GPU ("base:variant"): the
# base backend forced, plus the env var that selects the variant.
VARIANT_BACKENDS = {
    "triton:wt": ("triton", "LASS_SPARSE_TRITON_VARIANT", "wt"),
    "triton:wt_persistent": ("triton", "LASS_SPARSE_TRITON_VARIANT", "wt_persistent"),
    "triton:wt_tma": ("triton", "LASS_SPARSE_TRITON_VARIANT", "wt_tma"),
    "cuda:gemv2": ("cuda", "LASS_SPARSE_CUDA_GEMV", "v2"),
    "cuda:gemv3": ("cuda", "LASS_SPARSE_CUDA_GEMV", "v3"),
    "cupy:gemv2": ("cupy", "LASS_SPARSE_CUDA_GEMV", "v2"),
}
# Tests of the native kernels (not marked gpu) that run on the GPU machine too: its compiler
# builds the extensions there.
NATIVE_TESTS = ("tests/ops/test_hardening_ops.py", "tests/ops/test_cpu_kernels.py")


@dataclass
class Row:
    backend: str
    case: str
    dtype: str
    status: str  # PASS, FAIL, N/A, SKIP
    detail: str = ""


# ------------------------------------------------------------------------------------- cases


def _torch():
    import torch

    return torch


def _close(name, ours, ref, exact, dtype_name):
    """Raise AssertionError unless ``ours`` is within the flash-attention rule."""
    from lass_sparse.testing import within_torch_error

    ok, msg = within_torch_error(ours, ref, exact)
    if not ok:
        raise AssertionError(f"{name}: {msg}")
    return f"{name} {msg.split(' (')[0]}"


@contextlib.contextmanager
def _force(ls, backend):
    """``use_backend`` plus ``$LASS_SPARSE_BACKEND``: the autograd engine runs CUDA backward
    passes on its own threads, which do not see the context variable ``use_backend`` sets."""
    from lass_sparse.ops.registry import ENV_VAR

    base, var, value = VARIANT_BACKENDS.get(backend, (backend, None, None))
    env = {ENV_VAR: base, **({var: value} if var else {})}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with ls.use_backend(base):
            yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_linear_like(ls, backend, make, dtype, device):
    """``make(x, w, backend_name) -> output`` run for ours / reference (same dtype) / exact
    (float64 reference), with backward: compares output, dx, dW (+ off-mask zero) and db."""
    torch = _torch()
    details = []
    outs = {}
    for tag, be, dt in (("ours", backend, dtype), ("ref", "reference", dtype),
                        ("exact", "reference", torch.float64)):
        torch.manual_seed(1)
        inputs = make.inputs(dt, device)
        with _force(ls, be):
            y = make.forward(*inputs)
            ys = y if isinstance(y, tuple) else (y,)
            g = [torch.randn(t.shape, dtype=torch.float64, device=device).to(dt) for t in ys]
            torch.autograd.backward(ys, g)
        outs[tag] = ([t.detach() for t in ys],
                     [None if t.grad is None else t.grad for t in inputs
                      if isinstance(t, torch.Tensor) and t.requires_grad])
    for i, (o, r, e) in enumerate(zip(outs["ours"][0], outs["ref"][0], outs["exact"][0])):
        if o.shape != e.shape:
            raise AssertionError(f"out[{i}] shape {list(o.shape)} != {list(e.shape)}")
        details.append(_close(f"out{i}", o, r, e, dtype))
    names = make.grad_names
    for name, o, r, e in zip(names, outs["ours"][1], outs["ref"][1], outs["exact"][1]):
        if o is None:
            raise AssertionError(f"no gradient for {name}")
        details.append(_close(name, o, r, e, dtype))
        if name == "dW" and make.off_mask is not None and o[make.off_mask(device)].any():
            raise AssertionError("dW is not exactly 0 off the mask")
    return "; ".join(details[:2])


class _Case:
    grad_names: tuple = ()
    off_mask = None


def _linear_case(m, n, k, bias=True):
    torch = _torch()
    import lass_sparse as ls

    gen_mask = torch.Generator().manual_seed(7)
    mask = torch.rand(n, k, generator=gen_mask) > 0.5

    class C(_Case):
        grad_names = ("dx", "dW", "db") if bias else ("dx", "dW")

        @staticmethod
        def inputs(dt, dev):
            x = torch.randn(m, k, dtype=torch.float64).to(dev, dt).requires_grad_()
            w = (torch.randn(n, k, dtype=torch.float64) / k**0.5).to(dev, dt).requires_grad_()
            b = torch.randn(n, dtype=torch.float64).to(dev, dt).requires_grad_() if bias else None
            return (x, w, b) if bias else (x, w)

        @staticmethod
        def forward(x, w, b=None):
            return ls.masked_linear(x, w, ls.pack_mask(mask.to(x.device)), b)

        @staticmethod
        def off_mask(dev):
            return ~mask.to(dev)

    return C


def _segmented_case(t, n, k, p=3):
    torch = _torch()
    import lass_sparse as ls

    g = torch.Generator().manual_seed(8)
    masks = torch.rand(p, n, k, generator=g) > 0.5
    offs = torch.tensor([0, t // 3, t // 3, t])
    pair = torch.tensor([2, 0, 1])

    class C(_Case):
        grad_names = ("dx", "dW", "db")

        @staticmethod
        def inputs(dt, dev):
            x = torch.randn(t, k, dtype=torch.float64).to(dev, dt).requires_grad_()
            w = (torch.randn(n, k, dtype=torch.float64) / k**0.5).to(dev, dt).requires_grad_()
            b = torch.randn(n, dtype=torch.float64).to(dev, dt).requires_grad_()
            return x, w, b

        @staticmethod
        def forward(x, w, b):
            dev = x.device
            return ls.segmented_masked_linear(x, w, ls.pack_mask(masks.to(dev)), offs.to(dev),
                                              pair.to(dev), b)

    return C


def _qkv_case(bsz, t, d, h):
    torch = _torch()
    import lass_sparse as ls

    mask = torch.rand(3 * d, d, generator=torch.Generator().manual_seed(9)) > 0.5

    class C(_Case):
        grad_names = ("dx", "dW", "db")

        @staticmethod
        def inputs(dt, dev):
            x = torch.randn(bsz, t, d, dtype=torch.float64).to(dev, dt).requires_grad_()
            w = (torch.randn(3 * d, d, dtype=torch.float64) / d**0.5).to(dev, dt)
            b = torch.randn(3 * d, dtype=torch.float64).to(dev, dt).requires_grad_()
            return x, w.requires_grad_(), b

        @staticmethod
        def forward(x, w, b):
            return ls.masked_qkv_proj(x, w, ls.pack_mask(mask.to(x.device)), b, h)

        @staticmethod
        def off_mask(dev):
            return ~mask.to(dev)

    return C


def _cast_case(n, k):
    """masked_cast to float32 (the widening kernels on 16-bit weights) with its gradient."""
    torch = _torch()
    import lass_sparse as ls

    mask = torch.rand(n, k, generator=torch.Generator().manual_seed(11)) > 0.5

    class C(_Case):
        grad_names = ("dW",)

        @staticmethod
        def inputs(dt, dev):
            return (torch.randn(n, k, dtype=torch.float64).to(dev, dt).requires_grad_(),)

        @staticmethod
        def forward(w):
            return ls.masked_cast(w, ls.pack_mask(mask.to(w.device)), torch.float32)

        @staticmethod
        def off_mask(dev):
            return ~mask.to(dev)

    return C


def _module_case(kind, bsz, t, d, h=4):
    """MaskedLinear / MaskedMultiheadAttention with an attached MaskBank and an active pair."""
    torch = _torch()
    import lass_sparse as ls

    class C(_Case):
        grad_names = ("dx",)
        built: dict = {}

        @staticmethod
        def inputs(dt, dev):
            torch.manual_seed(3)
            if kind == "linear":
                mod = ls.MaskedLinear(d, 2 * d)
            else:
                mod = ls.MaskedMultiheadAttention(d, h, batch_first=True)
            mod = mod.to(dev, torch.float64)
            bank = ls.MaskBank.from_model(mod, alpha=0.5, pair="en-de")
            mod = mod.to(dt)
            ls.attach(mod, bank.to(dev))
            C.built[dt] = mod
            x = torch.randn(bsz, t, d, dtype=torch.float64).to(dev, dt).requires_grad_()
            return (x,)

        @staticmethod
        def forward(x):
            mod = C.built[x.dtype]
            with ls.active_pair(mod, "en-de"):
                if kind == "linear":
                    return mod(x)
                return mod(x, x, x, need_weights=False)[0]

    return C


def _adamw_case(ls, backend, dtype, device, through_optimizer):
    """masked_adamw_ (a list mixing the dtype with float32) or MaskedAdamW (``through_optimizer``
    True, or "capturable": device step counts, masked_adamw_capturable_) against the reference:
    on-mask values within tolerance, off-mask p/m/v bit-identical."""
    torch = _torch()
    from lass_sparse.optim import MaskedAdamW

    g = torch.Generator().manual_seed(5)
    shapes = [(64, 100), (33,), (16, 40)]
    masks = [torch.rand(s, generator=g) > 0.5 if len(s) > 1 else None for s in shapes]
    p0 = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    g0 = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    dts = [dtype, torch.float32, dtype]  # mixed dtypes in one call
    results = {}
    for tag, be, dd in (("ours", backend, dts), ("ref", "reference", dts),
                        ("exact", "reference", [torch.float64] * 3)):
        ps = [p.to(device, dt) for p, dt in zip(p0, dd)]
        gs = [q.to(device, dt) for q, dt in zip(g0, dd)]
        bits = [None if mk is None else ls.pack_mask(mk.to(device)) for mk in masks]
        with _force(ls, be):
            if through_optimizer:
                params = [torch.nn.Parameter(p) for p in ps]
                opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.1,
                                  capturable=through_optimizer == "capturable")
                opt.set_masks(dict(zip(params, bits)))
                for _ in range(3):
                    for p, q in zip(params, gs):
                        p.grad = q.clone()
                    opt.step()
                ms = [opt.state[p]["exp_avg"] for p in params]
                vs = [opt.state[p]["exp_avg_sq"] for p in params]
                ps = [p.detach() for p in params]
            else:
                ms = [torch.zeros(p.shape, device=device) for p in ps]
                vs = [torch.zeros(p.shape, device=device) for p in ps]
                for step in (1, 2, 3):
                    ls.masked_adamw_(ps, gs, ms, vs, bits, lr=1e-2, weight_decay=0.1, step=step)
        results[tag] = (ps, ms, vs)
    details = []
    for i, mk in enumerate(masks):
        if mk is not None:
            off = ~mk.to(device)
            init = p0[i].to(device, dts[i])
            if not torch.equal(results["ours"][0][i][off], init[off]):
                raise AssertionError(f"param {i}: off-mask entries changed")
            for j, name in ((1, "exp_avg"), (2, "exp_avg_sq")):
                if results["ours"][j][i][off].any():
                    raise AssertionError(f"param {i}: off-mask {name} changed")
        details.append(_close(f"p{i}", results["ours"][0][i], results["ref"][0][i],
                              results["exact"][0][i], dts[i]))
    return "; ".join(details[:1])


def _expected_na(backend, case, dtype_name):
    """Calls a forced backend cannot serve by design (it must then raise BackendCannotServe):
    64 rows are more than cupy's decode GEMV takes, and than the CUDA extension's unless its
    cuBLAS route or GEMV v3 serves them (csrc/cuda/binding.cpp)."""
    base = VARIANT_BACKENDS.get(backend, (backend,))[0]
    if case != "masked_linear M=64" or base not in ("cuda", "cupy") or backend == "cuda:gemv3":
        return False  # (v3's GEMV takes up to 64 rows)
    if base == "cupy":
        return True
    from lass_sparse.backends import cuda

    return not cuda._cublas_serves("masked_linear", 64)


def cases(small: bool):
    """(name, kind, spec): the case list; ``small`` shrinks shapes for the CPU interpreter."""
    s = 1 if small else 4
    return [
        ("pack_mask", "bits", (37 * s, 70 * s)),
        ("unpack_mask", "bits", (37 * s, 70 * s)),
        ("magnitude_mask", "bits", (37 * s, 70 * s)),
        ("masked_cast", "linear", _cast_case(37 * s, 70 * s)),
        ("masked_linear M=5", "linear", _linear_case(5, 24 * s, 70 * s)),
        ("masked_linear M=64", "linear", _linear_case(64, 24 * s, 70 * s, bias=False)),
        ("segmented_masked_linear", "linear", _segmented_case(20, 24 * s, 45 * s)),
        ("masked_qkv_proj", "linear", _qkv_case(2, 5, 16 * s, 4)),
        ("masked_adamw_", "adamw", False),
        ("MaskedLinear+MaskBank", "linear", _module_case("linear", 2, 3, 16 * s)),
        ("MaskedMultiheadAttention+MaskBank", "linear", _module_case("mha", 2, 5, 16 * s)),
        ("MaskedAdamW", "adamw", True),
        ("MaskedAdamW capturable", "adamw", "capturable"),
    ]


def _bits_case(ls, backend, name, shape, dtype, device):
    torch = _torch()
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(shape, generator=g) > 0.5).to(device)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    with ls.use_backend("reference"):
        ref = {"pack_mask": lambda: ls.pack_mask(mask),
               "unpack_mask": lambda: ls.unpack_mask(ls.pack_mask(mask), shape[-1]),
               "magnitude_mask": lambda: ls.magnitude_mask(w, 0.7)}[name]()
        bits = ls.pack_mask(mask)
    with _force(ls, backend):
        got = {"pack_mask": lambda: ls.pack_mask(mask),
               "unpack_mask": lambda: ls.unpack_mask(bits, shape[-1]),
               "magnitude_mask": lambda: ls.magnitude_mask(w, 0.7)}[name]()
    if got.dtype != ref.dtype or not torch.equal(got, ref):
        raise AssertionError(f"{name}: differs from the reference (must be bit-exact)")
    return "bit-exact"


def run_cases(device: str, backends, dtype_names, small: bool, only: str | None = None,
              budget_s: float | None = None):
    """Every case per backend and dtype; past ``budget_s`` seconds the rest are reported as
    SKIP (time budget) so a lent machine's limited time still yields a complete table."""
    torch = _torch()
    t_start = time.time()
    import lass_sparse as ls
    from lass_sparse.ops.registry import BackendCannotServe

    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
              "fp16": torch.float16}
    rows = []
    for backend in backends:
        for name, kind, spec in cases(small):
            if only and only not in name:
                continue
            for dn in dtype_names:
                if kind == "bits" and name != "magnitude_mask" and dn != dtype_names[0]:
                    continue  # dtype-free ops: once
                dtype = dtypes[dn]
                if budget_s is not None and time.time() - t_start > budget_s:
                    rows.append(Row(backend, name, dn, "SKIP", f"time budget {budget_s:.0f}s"))
                    continue
                old_tf32 = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = dn == "tf32"
                t0 = time.time()
                try:
                    if kind == "bits":
                        detail = _bits_case(ls, backend, name, spec, dtype, device)
                    elif kind == "adamw":
                        detail = _adamw_case(ls, backend, dtype, device, spec)
                    else:
                        detail = _run_linear_like(ls, backend, spec, dtype, device)
                    if _expected_na(backend, name, dn):
                        rows.append(Row(backend, name, dn, "FAIL",
                                        "ran although the backend cannot serve it (supports() "
                                        "skipped)"))
                    else:
                        rows.append(Row(backend, name, dn, "PASS",
                                        f"{detail} [{time.time() - t0:.1f}s]"))
                except BackendCannotServe as e:
                    status = "N/A" if _expected_na(backend, name, dn) else "FAIL"
                    rows.append(Row(backend, name, dn, status, str(e).split(";")[0][:160]))
                except Exception as e:  # noqa: BLE001 - every case is reported, none stops us
                    tb = traceback.format_exc().strip().splitlines()
                    rows.append(Row(backend, name, dn, "FAIL",
                                    f"{type(e).__name__}: {str(e)[:200]} @ {tb[-3][:120]}"))
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return rows


# ------------------------------------------------------------------------------------ report


def table(rows, steps, backends_info, device_name) -> str:
    n_fail = sum(r.status == "FAIL" for r in rows) + sum(not ok for _, ok, _ in steps)
    out = [f"# GPU check on {device_name}", "",
           f"{sum(r.status == 'PASS' for r in rows)} passed, {n_fail} failed, "
           f"{sum(r.status == 'N/A' for r in rows)} not applicable, "
           f"{sum(r.status == 'SKIP' for r in rows)} skipped (time budget)", "", "## Steps", "",
           "| step | result | detail |", "|---|---|---|"]
    out += [f"| {s} | {'PASS' if ok else 'FAIL'} | {d} |" for s, ok, d in steps]
    out += ["", "## Backends", "", "| backend | active | reason |", "|---|---|---|"]
    out += [f"| {n} | {r['active']} | {r['reason']} |" for n, r in backends_info.items()]
    out += ["", "## Cases (vs the reference backend)", "",
            "| backend | case | dtype | result | detail |", "|---|---|---|---|---|"]
    out += [f"| {r.backend} | {r.case} | {r.dtype} | {r.status} | "
            f"{r.detail.replace('|', '/')} |" for r in rows]
    return "\n".join(out) + "\n"


def _run(cmd, log_path, env=None, timeout=None, append=False) -> tuple[bool, str]:
    t0 = time.time()
    with open(log_path, "a" if append else "w") as log:
        try:
            r = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               timeout=timeout)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    with open(log_path) as f:
        tail = [ln.strip() for ln in f.read().strip().splitlines()[-1:]]
    return rc == 0, f"rc={rc} in {time.time() - t0:.0f}s: {tail[0][:150] if tail else ''}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run every op, module and optimizer on the GPU "
                                             "against the reference; write a pass/fail table.")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO,
                                                                         "gpu_check_results"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dry", action="store_true",
                    help="cases only (no build, pytest or benchmarks), small shapes")
    ap.add_argument("--backends", nargs="+", help="default: the active GPU backends "
                                                  "(cpu device: reference, cpu, triton)")
    ap.add_argument("--dtypes", nargs="+", help="fp32 tf32 bf16 fp16 (cpu device: fp32)")
    ap.add_argument("--only", help="only cases whose name contains this")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-pytest", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true", help="no CLI pipeline, no profile")
    ap.add_argument("--step-timeout", type=float, default=420,
                    help="seconds each of build, pytest and benchmarks may run (default 420)")
    ap.add_argument("--cases-budget", type=float, default=None,
                    help="seconds for the case table; later cases are reported SKIP")
    ap.add_argument("--bench-max-time", type=float, default=0.1,
                    help="pytest-benchmark --benchmark-max-time per benchmark (default 0.1 s)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole check: each step gets at most what is left "
                         "(minus 15 s to write the table)")
    ap.add_argument("--bench-first", action="store_true",
                    help="run the benchmarks before pytest (when time is short)")
    a = ap.parse_args(argv)

    t_start = time.time()

    def left(cap: float | None) -> float | None:
        if a.deadline is None:
            return cap
        rest = max(1.0, a.deadline - (time.time() - t_start) - 15)
        return rest if cap is None else min(cap, rest)

    torch = _torch()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or `--device cpu --dry` to check the case list", file=sys.stderr)
        return 2
    if a.device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    elif "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    os.makedirs(a.out, exist_ok=True)
    steps = []
    full = not a.dry
    if full and not a.skip_build:
        env = dict(os.environ)
        env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
        ok, d = _run([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                      "--no-deps", "-e", "."], os.path.join(a.out, "build.log"), env=env,
                     timeout=left(a.step_timeout))
        steps.append(("build + install (pip -e .)", ok, d))
        # an editable install's path hook is read at interpreter start: import from the tree
        # (the build put the extensions there) in this already-running process
        sys.path.insert(0, REPO)

    import lass_sparse as ls

    info = ls.backends()
    print("lass_sparse.backends():")
    for n, r in info.items():
        print(f"  {n:9s} {'active' if r['active'] else 'inactive':8s} {r['reason']}")
    from lass_sparse.ops.registry import broken

    for n, why in broken().items():
        steps.append((f"backend {n} loads", False, why))
    if a.device == "cuda":
        if torch.version.cuda and not info["cuda"]["active"]:
            import shutil

            if shutil.which("nvcc") or os.environ.get("CUDA_HOME"):
                steps.append(("cuda extension built and loaded", False, info["cuda"]["reason"]))
        import importlib.util

        for n in ("triton", "cupy"):
            if importlib.util.find_spec(n) is not None and not info[n]["active"]:
                steps.append((f"backend {n} active", False, info[n]["reason"]))
    if a.backends:
        backends = a.backends
    elif a.device == "cuda":
        backends = [b for b in GPU_BACKENDS if info[b]["active"]]
        backends += [v for v, (base, _, _) in VARIANT_BACKENDS.items() if info[base]["active"]]
    else:
        backends = [b for b in ("reference", "cpu", "triton") if info[b]["active"]]
    dtypes = a.dtypes or (["fp32", "tf32", "bf16", "fp16"] if a.device == "cuda" else ["fp32"])
    t0 = time.time()
    rows = run_cases(a.device, backends, dtypes, small=a.device == "cpu", only=a.only,
                     budget_s=left(a.cases_budget))
    steps.append(("op/module/optimizer cases", all(r.status != "FAIL" for r in rows),
                  f"{len(rows)} cases over {', '.join(backends) or 'no backend'} in "
                  f"{time.time() - t0:.0f}s"))
    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    path = os.path.join(a.out, "gpu_check.md")

    def write():
        with open(path, "w") as f:
            f.write(table(rows, steps, info, dev_name))

    write()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run_pytest():
        import importlib.util

        extra = []
        if importlib.util.find_spec("xdist"):  # Triton compiles in parallel processes
            extra += ["-n", str(min(8, os.cpu_count() or 1))]
        if importlib.util.find_spec("pytest_timeout"):
            extra += ["--timeout", "180"]
        ok, d = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu or triton", "tests",
                      "-p", "no:cacheprovider", "-rfE", *extra],
                     os.path.join(a.out, "pytest.log"), env=env, timeout=left(a.step_timeout))
        steps.append(("pytest -m 'gpu or triton' tests", ok, d))
        # The native kernels' error paths with this machine's build: every op with wrong sizes
        # must raise, not crash (an extension built here once segfaulted wording an error).
        ok, d = _run([sys.executable, "-m", "pytest", "-q", *NATIVE_TESTS, "-p",
                      "no:cacheprovider", "-rfE", *extra],
                     os.path.join(a.out, "pytest.log"), env=env,
                     timeout=left(a.step_timeout), append=True)
        steps.append(("native kernels: hardening and CPU kernel tests", ok, d))
        write()

    def run_bench():
        js = os.path.join(a.out, "bench-gpu.json")
        ok, d = _run([sys.executable, "-m", "pytest", "benchmarks", "-m", "gpu",
                      "--benchmark-only", f"--benchmark-json={js}", "-p", "no:cacheprovider",
                      f"--benchmark-max-time={a.bench_max_time}", "--benchmark-min-rounds=5",
                      "-q", "-rfE"],
                     os.path.join(a.out, "bench.log"), env=env, timeout=left(a.step_timeout))
        if "rc=5" in d:  # pytest: no tests collected
            ok, d = False, "no GPU benchmarks collected (benchmarks -m gpu)"
        elif os.path.exists(js):  # a report even when a benchmark failed
            ok2, d2 = _run([sys.executable, "benchmarks/report.py", js, "-o",
                            os.path.join(a.out, "bench-gpu.md")],
                           os.path.join(a.out, "bench.log"), append=True)
            ok, d = ok and ok2, d if ok2 else d2
        steps.append(("benchmarks -m gpu (make bench-gpu)", ok, d))
        write()

    def run_pipeline():
        penv = dict(env, OUT=a.out)
        ok, d = _run(["bash", "tools/gpu_pipeline_check.sh"], os.path.join(a.out, "pipeline.out"),
                     env=penv, timeout=left(a.step_timeout))
        if ok:  # the script tees pipeline.log itself; keep its output only when it failed
            os.remove(os.path.join(a.out, "pipeline.out"))
        steps.append(("CLI pipeline on the GPU (gpu_pipeline_check.sh)", ok, d))
        ok, d = _run([sys.executable, "tools/profile_step.py", "--device", "cuda", "--out",
                      a.out], os.path.join(a.out, "profile.log"), env=env,
                     timeout=left(a.step_timeout))
        if ok:  # profile.txt holds the tables
            os.remove(os.path.join(a.out, "profile.log"))
        steps.append(("joint-step profile (profile_step.py)", ok, d))
        write()

    order = [(not a.skip_pytest, run_pytest), (not a.skip_bench, run_bench)]
    if a.bench_first:
        order.reverse()
    order.append((not a.skip_pipeline, run_pipeline))
    for wanted, fn in order:
        if full and wanted:
            fn()
    failed = [r for r in rows if r.status == "FAIL"] + [s for s in steps if not s[1]]
    print(f"gpu_check: {len(rows)} cases, {len(failed)} failures; table: {path}")
    for r in rows:
        if r.status == "FAIL":
            print(f"  FAIL {r.backend} {r.case} {r.dtype}: {r.detail}")
    for s, ok, d in steps:
        if not ok:
            print(f"  FAIL step {s}: {d}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
