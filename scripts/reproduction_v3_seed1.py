"""Reproduction v3, second seed (issue 14): the fine-tune → prune → joint pass and the dense
continuation again from the same θ0 (v3's ``base/best``) with ``--seed 1``, the v3 recipe and
caps unchanged (fine-tunes cap 400 at lr 1e-3, dropout 0.3; joint at α=0.5 and dense cap 800 at
lr 5e-4; patience 4), so the LaSS-vs-dense comparison is measured twice.

1. fine-tunes every direction with seed 1 into ``ft-s1/<dir>`` (2 ranks, each its share of
   the directions, as v3);
2. prunes them at v3's α into ``masks-s1.safetensors``;
3. joint-trains LaSS-s1 and the dense continuation dense-s1 (two 1-thread processes);
4. evaluates both on the 6 supervised and the 6 zero-shot directions (full test set, beam 4;
   two processes at a time);
5. writes ``RUN/v3-seed1.json``: results, paired bootstraps (LaSS-s1 vs dense-s1; LaSS-s1 vs
   seed 0's dense; both seeds pooled: LaSS vs dense over 12 seed×direction sets), and the mask
   diagnostic the issue asks for, same-direction similarity across seeds vs cross-direction
   similarity within a seed.

Resumable: rerunning the command continues from the stages' checkpoints.

    python scripts/reproduction_v3_seed1.py runs/v3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reproduction_v3 import (  # noqa: E402
    CLI,
    COMMON,
    FT,
    JOINT,
    SUPERVISED,
    TORCHRUN,
    ZERO,
    curve,
    done,
    log,
    sh,
    stage_summary,
    timings,
)

SEED = ["--seed", "1"]
SYSTEMS = {"LaSS-s1": ("joint-s1", "masks-s1.safetensors"), "dense-s1": ("dense-s1", None)}


PARTS = [f"{n}@{split}" for split in ("supervised", "zero") for n in SYSTEMS]


def _eval_path(run_dir: str, part: str) -> str:
    name, split = part.split("@")
    return os.path.join(run_dir, f"v3-seed1-eval-{name}.json" if split == "supervised"
                        else f"v3-seed1-zero-{name}.json")


def evaluate_part(run_dir: str, part: str, limit: int | None) -> None:
    """One system (``NAME@supervised`` or ``NAME@zero``: the 6 supervised or the 6 zero-shot
    directions) in this process (1 thread)."""
    import torch

    from lass_sparse.lass import pipeline as P
    from lass_sparse.masks import atomic_write

    torch.set_num_threads(1)
    run = P.open_run(run_dir, device="cpu")
    name, split = part.split("@")
    hyps: dict = {}
    res = P.evaluate(run, {name: SYSTEMS[name]}, SUPERVISED if split == "supervised" else ZERO,
                     limit=limit, progress=False, hyps_out=hyps)
    atomic_write(_eval_path(run_dir, part), json.dumps({"results": res, "hyps": hyps}).encode())


def report(run_dir: str, alpha: float, timings: dict) -> dict:
    from lass_sparse.lass import pipeline as P
    from lass_sparse.lass.data import parse_direction
    from lass_sparse.lass.evaluate import pooled_bootstrap
    from lass_sparse.masks import MaskBank, atomic_write

    with open(os.path.join(run_dir, "v3-eval-supervised.json")) as f:
        s0 = json.load(f)
    hyps = {k: s0["hyps"][k] for k in ("dense", "LaSS")}
    res = {k: s0["results"][k] for k in ("dense", "LaSS")}
    zhyps, zres = {}, {}
    for part in PARTS:
        with open(_eval_path(run_dir, part)) as f:
            e = json.load(f)
        (hyps if part.endswith("@supervised") else zhyps).update(e["hyps"])
        (res if part.endswith("@supervised") else zres).update(e["results"])
    sig = {"LaSS-s1 vs dense-s1": P.significance(
               {k: hyps[k] for k in ("dense-s1", "LaSS-s1")}, "dense-s1", SUPERVISED),
           "LaSS-s1 vs dense": P.significance(
               {k: hyps[k] for k in ("dense", "LaSS-s1")}, "dense", SUPERVISED),
           "zero-shot: LaSS-s1 vs dense-s1": P.significance(zhyps, "dense-s1", ZERO)}
    both = {}
    for d in SUPERVISED:
        tgt = parse_direction(d)[1]
        for lass, dense in (("LaSS", "dense"), ("LaSS-s1", "dense-s1")):
            base_h, refs = hyps[dense][d]
            both[f"{d}@{lass}"] = (base_h, hyps[lass][d][0], refs, tgt)
    pooled_seeds = pooled_bootstrap(both)
    b0 = MaskBank.load(os.path.join(run_dir, f"masks-a{alpha}.safetensors"))
    b1 = MaskBank.load(os.path.join(run_dir, "masks-s1.safetensors"))
    for d in SUPERVISED:  # seed 1's masks beside seed 0's, under their own names
        b0.add_pair(f"{d}@s1", b1[d])
    same = {d: b0.similarity(d, f"{d}@s1") for d in SUPERVISED}
    cross0 = [b0.similarity(x, y) for x in SUPERVISED for y in SUPERVISED if x != y]
    cross1 = [b1.similarity(x, y) for x in SUPERVISED for y in SUPERVISED if x != y]
    stages = [f"ft-s1/{d}" for d in SUPERVISED] + ["joint-s1", "dense-s1"]
    out = {"alpha": alpha, "results": res, "zero_shot": zres, "significance": sig,
           "pooled_over_seeds": pooled_seeds,
           "similarity": {"same_direction_across_seeds": same,
                          "cross_direction_seed0": {"mean": sum(cross0) / len(cross0),
                                                    "min": min(cross0), "max": max(cross0)},
                          "cross_direction_seed1": {"mean": sum(cross1) / len(cross1),
                                                    "min": min(cross1), "max": max(cross1)}},
           "stages": {s: stage_summary(run_dir, s) for s in stages},
           "curves": {s: curve(run_dir, s) for s in stages}, "timings_s": timings}
    atomic_write(os.path.join(run_dir, "v3-seed1.json"), json.dumps(out, indent=1).encode())
    log(f"wrote {run_dir}/v3-seed1.json")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--ft-cap", type=int, default=400)
    ap.add_argument("--joint-cap", type=int, default=800)
    ap.add_argument("--limit", type=int, help="test rows per direction (default: all 1,000)")
    ap.add_argument("--eval-part", choices=PARTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.eval_part:
        return evaluate_part(a.run, a.eval_part, a.limit)
    run = a.run
    with open(os.path.join(run, "v3-alpha.json")) as f:
        alpha = json.load(f)["alpha"]
    t, save_t = timings(os.path.join(run, "v3-seed1-timings.json"))

    R = ["--run", run]
    if not all(done(run, f"ft-s1/{d}", a.ft_cap) for d in SUPERVISED):
        sh([TORCHRUN + ["finetune"] + R + COMMON + SEED +
            ["--pair", "all", "--steps", str(a.ft_cap), "--out-prefix", "ft-s1"] + FT],
           "fine-tunes (seed 1)", t)
        save_t()
    if not os.path.exists(os.path.join(run, "masks-s1.safetensors")):
        sh([CLI + ["prune"] + R + ["--alpha", str(alpha), "--ft-prefix", "ft-s1", "--out",
                                   "masks-s1.safetensors"]], f"prune α={alpha} (seed 1)", t)
        save_t()
    if not (done(run, "joint-s1", a.joint_cap) and done(run, "dense-s1", a.joint_cap)):
        sh([CLI + ["joint"] + R + COMMON + JOINT + SEED +
            ["--steps", str(a.joint_cap), "--masks", "masks-s1.safetensors", "--out",
             "joint-s1"],
            CLI + ["train"] + R + COMMON + JOINT + SEED +
            ["--steps", str(a.joint_cap), "--init", "base", "--out", "dense-s1"]],
           "joint-s1 | dense-s1", t)
        save_t()
    todo = [p for p in PARTS if not os.path.exists(_eval_path(run, p))]
    if todo:
        lim = ["--limit", str(a.limit)] if a.limit else []
        sh([[sys.executable, os.path.abspath(__file__), run, "--eval-part", n] + lim
            for n in todo], "evaluate " + " | ".join(todo), t)
        save_t()
    t0 = time.time()
    report(run, alpha, t)
    log(f"report in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
