"""Compile every Triton kernel ahead of time for GPU targets, without a GPU.

    python -m lass_sparse.backends.triton.aot_check [--arch 80 90] [--dtype bf16 fp16 fp32]

Catches what the CPU interpreter cannot (lowering, layouts, register pressure errors). Must run
without ``TRITON_INTERPRET`` (interpreted functions cannot be compiled).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

INT_PTRS = ("bits_ptr", "tile_lo", "tile_hi", "tile_pair", "seg_lo", "seg_hi", "seg_pair")


def compile_all(archs: list[int], dtypes: list[str], all_configs: bool = False) -> list[str]:
    """Compile each kernel (and segmented variant) per dtype and arch: with the default launch
    config, or (``all_configs``) with every autotuning candidate at BLOCK_M=128."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import kernels as K

    done = []
    for name in ("_fwd_kernel", "_dx_kernel", "_dw_kernel", "_qkv_kernel"):
        fn = getattr(K, name)
        params = list(inspect.signature(fn.fn).parameters)
        for dt in dtypes:
            for seg in (False, True):
                if seg and "SEGMENTED" not in params:
                    continue
                cands = K._CANDIDATES["fp32" if dt == "fp32" else "16bit"]
                configs = [(128, *c) for c in cands] if all_configs else [(64, *cands[0])]
                for bm, bn, bk, warps, stages in configs:
                    sig, const = {}, {}
                    for p in params:
                        if p.endswith("_ptr") or p in INT_PTRS:
                            sig[p] = "*i32" if p in INT_PTRS else f"*{dt}"
                        elif p.isupper() or p.startswith("BLOCK_"):
                            sig[p] = "constexpr"
                            const[p] = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                                        "SEGMENTED": seg, "IEEE": False}.get(p, True)
                        else:
                            sig[p] = "i32"
                    src = ASTSource(fn=fn, signature=sig,
                                    constexprs={(params.index(k),): v for k, v in const.items()})
                    for arch in archs:
                        t = time.time()
                        triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                       options={"num_warps": warps, "num_stages": stages})
                        done.append(f"{name} {dt} seg={seg} {bm}x{bn}x{bk} w{warps} s{stages} "
                                    f"sm_{arch}: {time.time() - t:.1f}s")
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--all-configs", action="store_true", help="every autotuning candidate")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    for line in compile_all(a.arch, a.dtype, a.all_configs):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
