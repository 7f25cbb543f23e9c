"""Where a LaSS step's time goes: torch.profiler tables for one masked_linear forward+backward
and one joint-training step (masked forward, masked dW, MaskedAdamW), ours vs dense.

    python tools/profile_step.py [--device cuda|cpu] [--config base] [--out DIR]

Prints wall time per call (median of --iters, synchronised) and the top operators by self CPU
time (the host-side cost: Python dispatch, custom-op machinery, launches) and, on CUDA, by
self device time. Tables also go to ``DIR/profile.txt`` when ``--out`` is given. A diagnostic
for the per-call overhead, not a benchmark: ratios for claims come from ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lass_sparse as ls  # noqa: E402
from lass_sparse.lass.model import Seq2Seq, label_smoothed_loss, make_config  # noqa: E402
from lass_sparse.optim import MaskedAdamW  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _wall(fn, device: str, iters: int) -> float:
    for _ in range(2):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _profile(fn, device: str, rows: int) -> str:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            fn()
        _sync(device)
    ka = prof.key_averages()
    out = [ka.table(sort_by="self_cpu_time_total", row_limit=rows)]
    if device == "cuda":
        out.append(ka.table(sort_by="self_device_time_total", row_limit=rows))
    return "\n".join(out)


def linear_case(device: str, dtype: torch.dtype, m: int, n: int, k: int):
    x = torch.randn(m, k, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(n, k, dtype=dtype, device=device) / k**0.5).requires_grad_()
    bits = ls.pack_mask(torch.rand(n, k, device=device) < 0.5)

    def ours():
        ls.masked_linear(x, w, bits).sum().backward()

    def dense():
        torch.nn.functional.linear(x, w).sum().backward()

    return {"ours": ours, "dense": dense}


def joint_case(device: str, config: str, batch: int, t: int):
    torch.manual_seed(0)
    cases = {}
    for impl in ("ours", "dense"):
        model = Seq2Seq(make_config(config, 8000, dropout=0.0)).to(device)
        g = torch.Generator().manual_seed(0)
        src = torch.randint(5, 8000, (batch, t), generator=g).to(device)
        tgt = torch.randint(5, 8000, (batch, t + 1), generator=g).to(device)
        if impl == "ours":
            bank = ls.MaskBank.from_model(model, 0.5, pair="en-de")
            opt = MaskedAdamW(model.parameters(), lr=1e-4)
            ls.attach(model, bank)
            opt.bind(model, bank)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

        def step(model=model, opt=opt, src=src, tgt=tgt, impl=impl):
            if impl == "ours":
                with ls.active_pair(model, "en-de"):
                    label_smoothed_loss(model(src, tgt[:, :-1]), tgt[:, 1:]).backward()
                opt.note_pair("en-de")
            else:
                label_smoothed_loss(model(src, tgt[:, :-1]), tgt[:, 1:]).backward()
            opt.step()
            opt.zero_grad()

        cases[impl] = step
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cuda", "cpu"])
    ap.add_argument("--config", default="base", help="joint step model config (tiny, base)")
    ap.add_argument("--batch", type=int, default=None,
                    help="joint step sentences (default: cuda 256, cpu 8)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("profile_step: no CUDA device", file=sys.stderr)
        return 2
    batch = a.batch or (256 if a.device == "cuda" else 8)
    report = [f"# profile_step on {torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'}"
              f"; torch {torch.__version__}; backends: "
              + ", ".join(n for n, r in ls.backends().items() if r["active"])]
    groups = [("masked_linear fwd+bwd bf16 M=256 N=4096 K=1024",
               linear_case(a.device, torch.bfloat16, 256, 4096, 1024)),
              (f"joint step {a.config} batch={batch}x24",
               joint_case(a.device, a.config, batch, 24))]
    for title, cases in groups:
        walls = {impl: _wall(fn, a.device, a.iters) for impl, fn in cases.items()}
        report.append(f"\n## {title}\n" + "; ".join(
            f"{impl} {w * 1e3:.3f} ms" for impl, w in walls.items())
            + f"; ours/dense {walls['ours'] / walls['dense']:.2f}x")
        for impl, fn in cases.items():
            report.append(f"\n### {impl}\n" + _profile(fn, a.device, a.rows))
    text = "\n".join(report)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "profile.txt"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
