"""Reproduction v2, second seed on the main (src) run: fine-tune every direction, joint-train LaSS
with seed 1 from the same θ0 (its best checkpoint), plus the dense continuation with seed 1, same
recipe and caps as seed 0; then evaluate on the full test set with hypotheses and run the paired
bootstraps: LaSS-s1 vs dense-s1, LaSS vs shared (seed 0, the direct control test), and report
seed-0 vs seed-1 mask similarity per direction. Resumable (every stage checkpoints).

    OMP_NUM_THREADS=1 python scripts/reproduction_seed1.py runs/src   # the run of `recipe variant`
"""
import json
import sys
import time

import torch

from lass_sparse.lass import pipeline as P
from lass_sparse.masks import MaskBank, atomic_write  # noqa: E402

torch.set_num_threads(1)
run = P.open_run(sys.argv[1] if len(sys.argv) > 1 else "runs/src")
dirs = run.directions
common = {"progress": False, "amp": "bf16", "max_tokens": 4096, "batch_size": 4096,
          "valid_limit": 200, "seed": 1, "patience": 4}
ft = dict(common, validate_every=30, lr=1e-3, warmup=20, dropout=0.3)
jk = dict(common, validate_every=50, lr=2e-3, warmup=200)
t = {}


def timed(label, fn, *a, **k):
    t0 = time.time()
    out = fn(*a, **k)
    t[label] = round(time.time() - t0, 1)
    print(f"[seed1] {label}: {t[label]} s", flush=True)
    return out


summary = {}
for d in dirs:
    summary[f"ft-seed1/{d}"] = timed(f"finetune {d}", P.finetune, run, d, 120, init="base",
                                     out=f"ft-seed1/{d}", **ft)
timed("prune", P.prune, run, 0.5, out="masks-seed1.safetensors", ft_prefix="ft-seed1")
summary["joint-seed1"] = timed("joint", P.joint, run, "masks-seed1.safetensors", 250,
                               init="base", out="joint-seed1", **jk)
summary["dense-seed1"] = timed("dense", P.train, run, 250, out="dense-seed1", init="base", **jk)
b0 = MaskBank.load(run.path("masks-a0.5.safetensors"))
b1 = MaskBank.load(run.path("masks-seed1.safetensors"))
sim = {}
for d in dirs:
    m = MaskBank.load(run.path("masks-a0.5.safetensors"))
    m.add_pair(f"{d}@seed1", b1[d])
    sim[d] = m.similarity(d, f"{d}@seed1")
cross = [b0.similarity(a, b) for a in dirs for b in dirs if a != b]
systems = {"dense": ("dense", None), "LaSS": ("joint-a0.5", "masks-a0.5.safetensors"),
           "shared": ("joint-shared", "masks-shared.safetensors"),
           "dense-s1": ("dense-seed1", None),
           "LaSS-s1": ("joint-seed1", "masks-seed1.safetensors")}
hyps = {}
res = timed("evaluate", P.evaluate, run, systems, dirs, progress=False, hyps_out=hyps)
sig = {"LaSS-s1 vs dense-s1": P.significance({k: hyps[k] for k in ("dense-s1", "LaSS-s1")},
                                             "dense-s1", dirs),
       "LaSS vs shared": P.significance({k: hyps[k] for k in ("shared", "LaSS")}, "shared",
                                        dirs),
       "LaSS vs dense": P.significance({k: hyps[k] for k in ("dense", "LaSS")}, "dense", dirs)}
out = {"results": res, "significance": sig, "seed_similarity": sim,
       "cross_direction_similarity_seed0": {"mean": sum(cross) / len(cross), "min": min(cross),
                                            "max": max(cross)},
       "stages": summary, "timings_s": t, "test_rows": {d: res["LaSS"][d]["n"] for d in dirs}}
atomic_write(run.path("seed1.json"), json.dumps(out, indent=1).encode())
md = [P.render_table(res, dirs, baseline="dense")]
for name, s in sig.items():
    md.append(P.render_significance(s, name.split(" vs ")[1]))
atomic_write(run.path("seed1.md"), "\n\n".join(md).encode())
print("\n\n".join(md))
sys.exit(0)
