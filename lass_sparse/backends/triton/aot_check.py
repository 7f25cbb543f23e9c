"""Compile every Triton kernel ahead of time for GPU targets, without a GPU, and report resources.

    python -m lass_sparse.backends.triton.aot_check [--arch 80 90] [--dtype bf16 fp16 fp32 tf32]
                                                    [--all-configs] [--max-bucket-only]
                                                    [--kernels fwd dx ...] [--json PATH]

Each kernel is compiled with the *real runtime signature*: the launcher in ``kernels.py`` is
called on meta tensors of a representative shape (M = 16 / 256 / 4096 rows for the three M
buckets, N = K = 4096, the QKV projection at B·T = M, D = 1024) with the kernel replaced by a
recorder, and the recorded arguments are specialized by Triton's own binder for the target (ints
become ``i32``/``i64`` with their divisibility, stride 1 a constant, pointers 16-byte aligned)
— so M, N, K, NW, ... stay runtime values and the K loop is compiled as it runs.

For each candidate it prints registers, spilled bytes and shared memory, and whether the config
fits the architecture (shared memory per block: sm_80 163 KB, sm_90 227 KB; <= 255 registers;
at most SPILL_BUDGET bytes of spill stores). Exit status 1 if any candidate fails to compile or
does not fit. ``tf32`` is fp32 with
``torch.backends.cuda.matmul.allow_tf32 = True`` (TF32 ``tl.dot``); ``fp32`` is IEEE.

Catches what the CPU interpreter cannot (lowering, layouts, resources). Must run without
``TRITON_INTERPRET`` (interpreted functions cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

# Max dynamic shared memory per block (opt-in), bytes: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_REGS = 255
SPILL_BUDGET = 512  # bytes of spill stores a kept candidate may have (a few, not a loop's worth)
BUCKET_M = {16: 16, 64: 256, 128: 4096}  # bucket BLOCK_M -> representative M
N = K = 4096
QKV_D, QKV_H = 1024, 16


# Issue 29's "W as A" variant (kernels_wt.py): (name, kernel attribute, call(kw, dtype, m), the
# config tuple (BLOCK_A, BLOCK_M, BLOCK_K, GROUP, warps, stages) per M bucket it is checked at).
WT_M = (16, 256, 4096)


@dataclass
class Result:
    kernel: str
    dtype: str
    arch: int
    config: tuple
    registers: int | None = None
    spill_bytes: int | None = None
    shared: int | None = None
    seconds: float = 0.0
    error: str = ""
    loop_converts: int | None = None  # convert_layout ops inside the main K loop (TTGIR)
    wgmma: int | None = None  # async warp_group_dot ops inside it (Hopper's wgmma)

    @property
    def fits(self) -> bool:
        return (not self.error and self.shared is not None
                and self.shared <= SMEM_LIMIT.get(self.arch, 99 * 1024)
                and (self.registers or 0) <= MAX_REGS
                and (self.spill_bytes or 0) <= SPILL_BUDGET)

    def line(self) -> str:
        bm, bn, bk, w, s = self.config
        head = f"{self.kernel} {self.dtype} {bm}x{bn}x{bk} w{w} s{s} sm_{self.arch}:"
        if self.error:
            return f"{head} ERROR {self.error}"
        verdict = ("ok" if self.fits else "SPILLS TOO MUCH"
                   if (self.spill_bytes or 0) > SPILL_BUDGET else "DOES NOT FIT")
        loop = ("" if self.loop_converts is None else
                f" loop: convert_layout={self.loop_converts} async wgmma={self.wgmma}")
        return (f"{head} regs={self.registers} spill={self.spill_bytes}B "
                f"smem={self.shared / 1024:.1f}KB{loop} {verdict} ({self.seconds:.1f}s)")


class _Recorder:
    """Stands in for a JITFunction: ``rec[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "tf32": torch.float32}[name]


def _lin(dt, m):
    """Meta tensors ``x [m, K]``, ``W [N, K]``, ``bits [N, K/32]`` of the checked shape."""
    import torch

    return (torch.empty(m, K, dtype=dt, device="meta"),
            torch.empty(N, K, dtype=dt, device="meta"),
            torch.empty(N, K // 32, dtype=torch.int32, device="meta"))


def _bank():
    """A meta bank of two masks of the checked shape."""
    import torch

    return torch.empty(2, N, K // 32, dtype=torch.int32, device="meta")


def _fwd(kk, dt, m):
    import torch

    x, w, bits = _lin(dt, m)
    kk.masked_linear(x, w, bits, torch.empty(N, dtype=dt, device="meta"))


def _dx(kk, dt, m):
    import torch

    _, w, bits = _lin(dt, m)
    kk.masked_linear_dx(torch.empty(m, N, dtype=dt, device="meta"), w, bits)


def _dw_acc(kk, dt, m):
    import torch

    x, _, bits = _lin(dt, m)
    kk.masked_linear_dw_accumulate_(torch.empty(N, K, dtype=torch.float32, device="meta"),
                                    torch.empty(m, N, dtype=dt, device="meta"), x, bits)


def _variants():
    """(name, kernel attribute, buckets, call(kernels, dtype, m)) for every kernel variant."""
    import torch

    def dw(kk, dt, m):
        x, _, bits = _lin(dt, m)
        kk.masked_linear_dw(torch.empty(m, N, dtype=dt, device="meta"), x, bits)

    def _seg(m):
        return torch.tensor([0, m // 2, m]), torch.tensor([1, 0])

    def seg_fwd(kk, dt, m):
        x, w, _ = _lin(dt, m)
        kk.segmented_masked_linear(x, w, _bank(), *_seg(m),
                                   torch.empty(N, dtype=dt, device="meta"))

    def seg_dx(kk, dt, m):
        _, w, _ = _lin(dt, m)
        kk.segmented_masked_linear_dx(torch.empty(m, N, dtype=dt, device="meta"), w, _bank(),
                                      *_seg(m))

    def qkv(kk, dt, m):
        x = torch.empty(m // 16 if m >= 16 else 1, min(m, 16), QKV_D, dtype=dt, device="meta")
        w = torch.empty(3 * QKV_D, QKV_D, dtype=dt, device="meta")
        bits = torch.empty(3 * QKV_D, QKV_D // 32, dtype=torch.int32, device="meta")
        kk.masked_qkv_proj(x, w, bits, torch.empty(3 * QKV_D, dtype=dt, device="meta"), QKV_H)

    all_b = (16, 64, 128)
    return [
        ("fwd", "_fwd_kernel", all_b, _fwd),
        ("dx", "_dx_kernel", all_b, _dx),
        ("dw", "_dw_kernel", (64,), dw),
        ("dw_acc", "_dw_kernel", (64,), _dw_acc),
        ("seg_fwd", "_fwd_kernel", (64,), seg_fwd),
        ("seg_dx", "_dx_kernel", (64,), seg_dx),
        ("qkv", "_qkv_kernel", all_b, qkv),
    ]


def capture(kk, attr: str, call, dtype, m: int, cfg: tuple):
    """The (kernel, args, kwargs) the launcher passes for this call with config ``cfg``."""
    import torch

    rec = _Recorder(getattr(kk, attr))
    old_kernel, old_config, old_min_m = getattr(kk, attr), kk._config, kk.CUBLAS_MIN_M
    setattr(kk, attr, rec)
    kk._config = lambda *a, **k: cfg
    kk.CUBLAS_MIN_M = 2**62  # the fused kernels at every M (not the cuBLAS route)
    try:
        call(kk, dtype, m)
    finally:
        setattr(kk, attr, old_kernel)
        kk._config, kk.CUBLAS_MIN_M = old_config, old_min_m
    assert len(rec.calls) == 1, f"{attr}: expected one launch, got {len(rec.calls)}"
    args, kwargs = rec.calls[0]
    assert all(not isinstance(a, torch.Tensor) or a.device.type == "meta" for a in args)
    return rec.fn, args, kwargs


def ttgir_loop_stats(ttgir: str) -> tuple[int, int]:
    """(convert_layout ops, async warp_group_dot ops) inside the K loop of a TTGIR text: the
    innermost ``scf.for`` that holds a dot (a persistent kernel's tile loop holds the K loop)."""
    lines = ttgir.splitlines()
    best = None
    for start, ln in enumerate(lines):
        if "scf.for" not in ln:
            continue
        indent = " " * (len(ln) - len(ln.lstrip()))
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].startswith(indent + "}")), len(lines))
        body = lines[start:end]
        if any("warp_group_dot " in b or " tt.dot " in b for b in body):
            if best is None or len(body) < len(best):
                best = body
    if best is None:
        return 0, 0
    return (sum("ttg.convert_layout" in ln for ln in best),
            sum("ttng.warp_group_dot " in ln and "isAsync = true" in ln for ln in best))


def _wt_variants():
    """The kernels_wt.py launches: (name, attr, call(kw, dtype, m))."""
    import torch

    def seg_table(m):
        return torch.tensor([0, m // 2, m], device="meta"), torch.tensor([1, 0], device="meta")

    def seg(kw, dt, m):
        x, w, _ = _lin(dt, m)
        kw.segmented_masked_linear(x, w, _bank(), *seg_table(m), None)

    def seg_dx(kw, dt, m):
        _, w, _ = _lin(dt, m)
        kw.segmented_masked_linear_dx(torch.empty(m, N, dtype=dt, device="meta"), w, _bank(),
                                      *seg_table(m))

    def seg_dw(kw, dt, m):
        x, _, _ = _lin(dt, m)
        kw.segmented_masked_linear_dw(torch.empty(m, N, dtype=dt, device="meta"), x, _bank(),
                                      *seg_table(m))

    return [("wt_fwd", "_fwd_wt_kernel", _fwd, "wt"),
            ("wt_fwd_persistent", "_fwd_wt_persistent_kernel", _fwd, "wt_persistent"),
            ("wt_fwd_tma", "_fwd_wt_kernel", _fwd, "wt_tma"),
            ("wt_dx", "_dx_wt_kernel", _dx, "wt"),
            ("wt_dw_acc", "_dw_wt_kernel", _dw_acc, "wt"),
            ("wt_seg_fwd", "_seg_fwd_wt_kernel", seg, "wt"),
            ("wt_seg_dx", "_seg_dx_wt_kernel", seg_dx, "wt"),
            ("wt_seg_dw", "_seg_dw_wt_kernel", seg_dw, "wt")]


_WT_DW = ("_dw_wt_kernel", "_seg_dw_wt_kernel")


def compile_wt(archs: list[int], dtypes: list[str], progress=None,
               kernels: list[str] | None = None) -> list[Result]:
    """Compile each kernels_wt.py kernel, every candidate of its M bucket at M = 16, 256, 4096,
    and read the K loop of its TTGIR (no convert_layout wanted; wgmma on sm_90)."""
    from . import kernels_wt as kw

    results = []
    for name, attr, call, var in _wt_variants():
        if kernels and name not in kernels:
            continue
        for dt_name in dtypes:
            dt = _torch_dtype(dt_name)
            for m in WT_M if attr not in _WT_DW else WT_M[-1:]:
                with _tf32(dt_name == "tf32"):
                    cands = kw.candidates("dw" if attr in _WT_DW else "fwd", dt, m)
                for cfg in cands:
                    rec = _Recorder(getattr(kw, attr))
                    old_env = {v: os.environ.get(v) for v in (kw.VARIANT_ENV, kw.SPLIT_K_ENV)}
                    old_kernel, old_config = getattr(kw, attr), kw._config
                    setattr(kw, attr, rec)
                    kw._config = lambda *a, _c=cfg, **k: _c
                    os.environ[kw.VARIANT_ENV] = var
                    os.environ[kw.SPLIT_K_ENV] = "1"
                    try:
                        with _tf32(dt_name == "tf32"):
                            call(kw, dt, m)
                    finally:
                        setattr(kw, attr, old_kernel)
                        kw._config = old_config
                        for v, val in old_env.items():
                            os.environ.pop(v, None) if val is None else os.environ.update({v: val})
                    args, kwargs = rec.calls[0]
                    for arch in archs:
                        r = Result(f"{name}@M={m}", dt_name, arch, tuple(cfg[:3]) + cfg[4:])
                        results.append(_compile_into(r, rec.fn, args, kwargs, arch, progress,
                                                     ttgir=True))
    return results


def _compile_into(r: Result, fn, args, kwargs, arch: int, progress, ttgir: bool = False
                  ) -> Result:
    """Compile one candidate into ``r`` (registers, spills, shared memory, and with ``ttgir``
    the K loop's layout conversions and async wgmma), or its error; time it, report it."""
    t = time.time()
    try:
        kernel, r.registers, r.spill_bytes = compile_one(fn, args, kwargs, arch)
        r.shared = int(kernel.metadata.shared)
        if ttgir:
            r.loop_converts, r.wgmma = ttgir_loop_stats(kernel.asm["ttgir"])
    except Exception as e:  # noqa: BLE001 - reported per candidate
        r.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    r.seconds = time.time() - t
    if progress is not None:
        progress(r)
    return r


def _parse_ptxas(log: str) -> tuple[int | None, int | None]:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return (int(regs[-1]) if regs else None,
            sum(int(s) for s in spills) if spills else (0 if regs else None))


def compile_one(fn, args, kwargs, arch: int) -> tuple[object, int | None, int | None]:
    """Compile like ``JITFunction.run`` would for ``arch``: (kernel, registers, spill bytes)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    out = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(out):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    regs, spills = _parse_ptxas(out.getvalue())
    return kernel, regs, spills


@contextlib.contextmanager
def _tf32(on: bool):
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def compile_all(archs: list[int], dtypes: list[str], all_configs: bool = False,
                max_bucket_only: bool = False, progress=None,
                kernels: list[str] | None = None) -> list[Result]:
    """Compile each kernel variant per dtype and arch: the first candidate at the largest M
    bucket, or (``all_configs``) every candidate at every M bucket the variant uses (only the
    largest with ``max_bucket_only``)."""
    from . import kernels as kk

    if kk.INTERPRET:
        raise RuntimeError("aot_check: unset TRITON_INTERPRET (interpreted kernels cannot be "
                           "compiled)")
    results = []
    for name, attr, buckets, call in _variants():
        if kernels and name not in kernels:
            continue
        for dt_name in dtypes:
            dt = _torch_dtype(dt_name)
            for bm in (buckets[-1:] if max_bucket_only or not all_configs else buckets):
                with _tf32(dt_name == "tf32"):
                    cands = kk.candidates(dt, bm)
                for cfg in (cands if all_configs else cands[:1]):
                    with _tf32(dt_name == "tf32"):
                        fn, args, kwargs = capture(kk, attr, call, dt, BUCKET_M[bm], cfg)
                    for arch in archs:
                        results.append(_compile_into(Result(name, dt_name, arch, tuple(cfg)),
                                                     fn, args, kwargs, arch, progress))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"],
                    choices=["bf16", "fp16", "fp32", "tf32"])
    ap.add_argument("--all-configs", action="store_true", help="every autotuning candidate")
    ap.add_argument("--max-bucket-only", action="store_true",
                    help="with --all-configs: only the largest M bucket (the most resources)")
    ap.add_argument("--kernels", nargs="+", help="only these variants: fwd dx dw dw_acc "
                                                "seg_fwd seg_dx qkv (default: all)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--wt", action="store_true",
                    help="the kernels_wt.py variant instead (every candidate at M = 16, 256, "
                         "4096), with the TTGIR K-loop check; --kernels: wt_fwd "
                         "wt_fwd_persistent wt_fwd_tma wt_dx wt_dw_acc wt_seg_fwd wt_seg_dx "
                         "wt_seg_dw")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    # A fresh cache: a cached kernel skips ptxas, whose log gives registers and spills.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lass_aot_")
    show = lambda r: print(r.line(), flush=True)  # noqa: E731
    if a.wt:
        results = compile_wt(a.arch, a.dtype, progress=show, kernels=a.kernels)
    else:
        results = compile_all(a.arch, a.dtype, a.all_configs, a.max_bucket_only,
                              progress=show, kernels=a.kernels)
    bad = [r for r in results if not r.fits]
    print(f"aot_check: {len(results)} compiled, {len(bad)} failing or not fitting, "
          f"{sum(1 for r in results if r.spill_bytes)} spilling")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(asdict(r), fits=r.fits) for r in results], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
