"""Per-call host overhead of the ops at M=1 on a small shape (64x64), CPU or CUDA: µs per call,
the best of 7 repeats of N back-to-back calls (on CUDA one synchronize after the N calls, so
tiny kernels overlap and the number is the host's cost). Rows: F.linear, the op through
torch.ops (one dispatcher trip to the native kernel), the public function (plain eager direct
path), and the op's `.registry` overload: the Python body and the backend registry before the
kernel, the route every call took before the kernels registered under the public names.

    python tools/op_overhead.py --device cuda [--out overhead.md]
"""

from __future__ import annotations

import argparse
import sys
import timeit

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", help="also write the table here (markdown)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("op_overhead: no CUDA device", file=sys.stderr)
        return 2
    import lass_sparse

    torch.set_num_threads(1)
    dev = a.device
    x, w, b = (torch.randn(1, 64, device=dev), torch.randn(64, 64, device=dev),
               torch.randn(64, device=dev))
    bits = lass_sparse.pack_mask(torch.rand(64, 64, device=dev) > 0.5)
    op = torch.ops.lass_sparse
    ps = [torch.randn(64, 64, device=dev) for _ in range(4)]
    gs, ms, vs = ([torch.zeros_like(p) for p in ps] for _ in range(3))
    hp = (1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False)
    mask = torch.ones(64, 64, dtype=torch.bool, device=dev)
    cases = {
        "F.linear": lambda: torch.nn.functional.linear(x, w, b),
        "torch.ops masked_linear": lambda: op.masked_linear(x, w, bits, b),
        "public masked_linear (eager)": lambda: lass_sparse.masked_linear(x, w, bits, b),
        "masked_linear.registry (body route)": lambda: op.masked_linear.registry(x, w, bits, b),
        "torch.ops pack_mask": lambda: op.pack_mask(mask),
        "pack_mask.registry (body route)": lambda: op.pack_mask.registry(mask),
        "torch.ops masked_adamw_ (4 tensors)": lambda: op.masked_adamw_(ps, gs, ms, vs,
                                                                         [bits] * 4, *hp),
        "masked_adamw_.registry (body route)": lambda: op.masked_adamw_.registry(
            ps, gs, ms, vs, [bits] * 4, *hp),
    }
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    lines = [f"| call ({dev}, M=1, 64x64, no_grad) | µs per call |", "|---|---|"]
    with torch.no_grad():
        for name, f in cases.items():
            for _ in range(200):
                f()
            sync()

            def run(f=f):
                for _ in range(a.calls):
                    f()
                sync()

            t = min(timeit.repeat(run, number=1, repeat=7)) / a.calls * 1e6
            lines.append(f"| {name} | {t:.2f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
