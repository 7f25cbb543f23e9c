"""``lass-sparse showcase``: a short showcase of the packed-mask kernels on this machine.

Prints the active backends, the memory of per-pair masks for a Transformer-base model stored as bool
(the original LaSS code) vs 1-bit packed (ours), a correctness check of the fused kernel against the
reference, and indicative timings of masked_linear vs dense and naive. Benchmarks proper live in
``benchmarks/`` (``make bench``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# Masked weight shapes (N, K) of one Transformer-base (d=512, ffn=2048) encoder and decoder layer.
ENC_LAYER = [(512, 512)] * 4 + [(2048, 512), (512, 2048)]
DEC_LAYER = [(512, 512)] * 8 + [(2048, 512), (512, 2048)]
BASE_SHAPES = ENC_LAYER * 6 + DEC_LAYER * 6


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _median_time(f, x, reps: int) -> float:
    f(x)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def memory_table(pairs=(1, 8, 36, 100)) -> list[str]:
    import lass_sparse as ls

    # Real packed tensors for one pair, so the numbers are allocated bytes, not a formula.
    per_pair_packed = sum(ls.pack_mask(torch.ones(n, k, dtype=torch.bool)).nbytes
                          for n, k in BASE_SHAPES)
    per_pair_bool = sum(torch.ones(n, k, dtype=torch.bool).nbytes for n, k in BASE_SHAPES)
    weights = sum(n * k for n, k in BASE_SHAPES)
    rows = [f"masked weights: {weights / 1e6:.1f} M (Transformer-base, 6+6 layers)",
            f"{'pairs':>6}  {'bool (original)':>16}  {'packed (ours)':>14}  ratio"]
    for p in pairs:
        rows.append(f"{p:>6}  {_bytes(p * per_pair_bool):>16}  {_bytes(p * per_pair_packed):>14}"
                    f"  {per_pair_bool / per_pair_packed:.1f}x")
    return rows


def run(args: argparse.Namespace) -> int:
    import lass_sparse as ls
    from lass_sparse import reference

    torch.manual_seed(0)
    print("== backends")
    for name, row in ls.backends().items():
        print(f"  {name:<9} {'active' if row['active'] else 'off   '}  {row['reason']}")

    print("\n== per-pair mask memory")
    for line in memory_table():
        print("  " + line)

    n, k = args.n, args.k
    w = torch.randn(n, k) / k**0.5
    bits = ls.magnitude_mask(w, args.alpha)
    mask = ls.unpack_mask(bits, k)
    print(f"\n== masked_linear, W {n}x{k}, alpha={args.alpha} "
          f"(keeps {mask.float().mean():.1%}), fp32, {torch.get_num_threads()} threads")
    x = torch.randn(32, k, requires_grad=True)
    wp = w.clone().requires_grad_(True)
    y = ls.masked_linear(x, wp, bits)
    y.sum().backward()
    err = (y - reference.masked_linear(x, w, bits, None)).abs().max().item()
    print(f"  max |fused - reference| = {err:.2e};  off-mask dW nonzeros = "
          f"{int(wp.grad[~mask].count_nonzero())}")
    print(f"  {'M':>5}  {'dense':>9}  {'fused':>9}  {'naive':>9}  fused/dense  naive/dense")
    with torch.inference_mode():
        for m in args.m:
            xm = torch.randn(m, k)
            t = {name: _median_time(f, xm, args.reps) for name, f in (
                ("dense", lambda a: torch.nn.functional.linear(a, w)),
                ("fused", lambda a: ls.masked_linear(a, w, bits)),
                ("naive", lambda a: a @ (w * mask).T),
            )}
            print(f"  {m:>5}  {t['dense'] * 1e3:>7.2f}ms  {t['fused'] * 1e3:>7.2f}ms  "
                  f"{t['naive'] * 1e3:>7.2f}ms  {t['fused'] / t['dense']:>10.2f}x  "
                  f"{t['naive'] / t['dense']:>10.2f}x")
    print("\n(indicative timings; see `make bench` for the benchmark suite)")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("showcase", help="mask memory, fused-kernel check and timings")
    p.add_argument("--n", type=int, default=4096, help="weight rows (out features)")
    p.add_argument("--k", type=int, default=4096, help="weight columns (in features)")
    p.add_argument("--alpha", type=float, default=0.7, help="fraction of weights pruned")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 512], help="batch rows to time")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per point")
    p.set_defaults(func=run)
