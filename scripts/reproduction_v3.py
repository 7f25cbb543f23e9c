"""Reproduction v3 (issue 14): every stage run to its early-stopping rule, the released joint lr.

Starts from the θ0 of the v2 main run (``--from runs/src``: langtok src, masked output
projection, en-de/en-fr/en-zh, 10,000 sentences per direction) and

1. continues θ0 until validation loss stops improving (patience 4 validations, every 100 steps),
   as 2 DDP ranks of 1 thread (``torchrun``, 2,048 tokens per rank: the same 4,096-token global
   batch as v2);
2. fine-tunes every direction from the converged θ0 until its own stopping rule (2 ranks, each
   fine-tuning its share of the directions);
3. prunes at α ∈ {0.5, 0.7} and θ0's own mask (the shared-mask control);
4. joint-trains LaSS at both α, then the dense continuation and the shared-mask control at the α
   chosen on validation loss, all with the released peak lr 5e-4 (two 1-thread processes at a
   time), every one to its stopping rule;
5. (``--extend``, a third process once step 4's α is chosen) adds the pair de-fr/fr-de, pivoted
   through English, to the LaSS model: fine-tune both from θ0, prune at α, train only their
   sub-networks from the LaSS model, in paper mode and ``--strict``; evaluates old and new
   directions and checks that strict mode leaves every old pair's masked weights bit-identical;
6. evaluates θ0, dense, LaSS and shared on the 6 supervised directions and θ0, dense, LaSS on
   the 6 zero-shot directions (full 1,000-row test set, beam 4; two processes) and runs the paired
   bootstraps; writes ``RUN/v3.json``.

Every step resumes from its checkpoints, so rerunning the same command continues a killed run:

    python scripts/reproduction_v3.py runs/v3 --from runs/src
    python scripts/reproduction_v3.py runs/v3 --extend      # concurrently, 1 thread
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "lass_sparse.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "lass_sparse.cli", "--"]
COMMON = ["--amp", "bf16", "--device", "cpu", "--quiet", "--valid-limit", "200", "--patience", "4"]
JOINT = ["--max-tokens", "4096", "--lr", "5e-4", "--warmup", "200", "--validate-every", "50"]
SUPERVISED = ["en-de", "de-en", "en-fr", "fr-en", "en-zh", "zh-en"]
ZERO = ["de-fr", "de-zh", "fr-de", "fr-zh", "zh-de", "zh-fr"]
NEW = ["de-fr", "fr-de"]
FT = ["--max-tokens", "4096", "--lr", "1e-3", "--warmup", "20", "--dropout", "0.3",
      "--validate-every", "30"]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def log(msg: str) -> None:
    print(f"[v3 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def done(run: str, stage: str, cap: int) -> bool:
    """The stage stopped early or reached ``cap`` (its last checkpoint says so)."""
    path = os.path.join(run, stage, "ckpt", "state.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        st = json.load(f)
    return bool(st.get("valid", {}).get("stopped")) or st["step"] >= cap


def sh(cmds: list[list[str]], label: str, timings: dict) -> None:
    """Run commands concurrently (one core each); fail loudly if any fails."""
    t0 = time.time()
    log(f"{label}: start")
    procs = [subprocess.Popen(c, env=env()) for c in cmds]
    rcs = [p.wait() for p in procs]
    if any(rcs):
        raise SystemExit(f"{label} failed: exit codes {rcs}")
    timings[label] = round(time.time() - t0, 1)
    log(f"{label}: {timings[label]:.0f} s")


def evaluate_part(run_dir: str, part: str, limit: int | None) -> None:
    """One evaluation share in this process (1 thread): results and hypotheses to a JSON."""
    import torch

    from lass_sparse.lass import pipeline as P
    from lass_sparse.masks import atomic_write

    torch.set_num_threads(1)
    with open(os.path.join(run_dir, "v3-alpha.json")) as f:
        a = json.load(f)["alpha"]
    run = P.open_run(run_dir, device="cpu")
    lass = (f"joint-a{a}", f"masks-a{a}.safetensors")
    if part == "supervised":
        systems = {"theta0": ("base", None), "dense": ("dense", None), "LaSS": lass,
                   "shared": ("joint-shared", "masks-shared.safetensors")}
        dirs = SUPERVISED
    else:
        systems = {"theta0": ("base", None), "dense": ("dense", None), "LaSS": lass}
        dirs = ZERO
    hyps: dict = {}
    res = P.evaluate(run, systems, dirs, limit=limit, progress=False, hyps_out=hyps)
    atomic_write(os.path.join(run_dir, f"v3-eval-{part}.json"),
                 json.dumps({"results": res, "hyps": hyps}).encode())


def extension(a) -> None:
    """Step 5: de-fr/fr-de added to the LaSS model, paper mode and strict; v3-extend.json."""
    import torch

    from lass_sparse import unpack_mask
    from lass_sparse.lass import pipeline as P
    from lass_sparse.masks import atomic_write

    run, t = a.run, {}
    apath = os.path.join(run, "v3-alpha.json")
    while not os.path.exists(apath):  # the main process writes it after the α joints
        time.sleep(30)
    with open(apath) as f:
        alpha = json.load(f)["alpha"]
    lass, masks = f"joint-a{alpha}", f"masks-a{alpha}.safetensors"
    R = ["--run", run]
    if not all(done(run, f"extend-paper/ft/{d}", a.ext_ft_cap) for d in NEW):
        sh([CLI + ["finetune"] + R + COMMON + FT + ["--pair"] + NEW + [
            "--steps", str(a.ext_ft_cap), "--out-prefix", "extend-paper/ft"]],
           "extension fine-tunes", t)
    for mode in ("paper", "strict"):
        out = f"extend-{mode}"
        if mode == "strict" and not os.path.exists(os.path.join(run, out, "ft")):
            shutil.copytree(os.path.join(run, "extend-paper", "ft"), os.path.join(run, out, "ft"))
        if not done(run, out, a.ext_cap):
            sh([CLI + ["extend"] + R + COMMON + JOINT + ["--pair"] + NEW + [
                "--masks", masks, "--init", lass, "--ft-init", "base", "--ft-steps",
                str(a.ext_ft_cap), "--steps", str(a.ext_cap), "--out", out] +
                (["--strict"] if mode == "strict" else [])], f"extend {mode}", t)
    torch.set_num_threads(1)
    r = P.open_run(run, device="cpu")
    # strict mode: every old pair's effective weights W ⊙ M are bit-identical to LaSS's
    old = P.load_bank(r, masks)
    def weights(stage: str) -> dict:
        """Every state tensor, and the bank's masked weights by their bank names (a tied
        output projection's matrix is the embedding)."""
        model = r.load_model(stage, device="cpu")
        out = dict(model.state_dict())
        for n in old.shapes:
            mod, _, attr = n.rpartition(".")
            out[n] = getattr(model.get_submodule(mod), attr).detach()
        return out

    before = weights(lass)
    identical = {}
    dense = [n for n in before if n not in old.shapes]  # every pair's (embedding included)
    for mode in ("paper", "strict"):
        after = weights(f"extend-{mode}")
        diff = max(float((before[n] - after[n]).abs().max()) for n in dense)
        for d in old.pairs:
            for n, bits in old[d].items():
                m = unpack_mask(bits, old.shapes[n][-1])
                diff = max(diff, float(((before[n] - after[n]) * m).abs().max()))
        identical[mode] = diff
    systems_old = {f"extend-{m}": (f"extend-{m}", f"extend-{m}/masks.safetensors")
                   for m in ("paper", "strict")}
    systems_new = {"theta0": ("base", None), "LaSS (zero-shot)": (lass, masks), **systems_old}
    hyps: dict = {}
    t0 = time.time()
    res_old = P.evaluate(r, systems_old, SUPERVISED, limit=a.limit, progress=False,
                         hyps_out=hyps)
    hyps_new: dict = {}
    res_new = P.evaluate(r, systems_new, NEW, limit=a.limit, progress=False, hyps_out=hyps_new)
    t["evaluate"] = round(time.time() - t0, 1)
    stages = [f"extend-paper/ft/{d}" for d in NEW] + ["extend-paper", "extend-strict"]
    atomic_write(os.path.join(run, "v3-extend.json"), json.dumps({
        "alpha": alpha, "old_pair_max_abs_weight_change": identical,
        "results_old": res_old, "results_new": res_new, "hyps_old": hyps,
        "hyps_new": hyps_new, "stages": {s: stage_summary(run, s) for s in stages},
        "curves": {s: curve(run, s) for s in stages}, "timings_s": t,
        "train_examples": {d: len(r.corpus.examples(d)) for d in NEW}}, indent=1).encode())
    log(f"wrote {run}/v3-extend.json")


def curve(run: str, stage: str) -> list[dict]:
    path = os.path.join(run, stage, "log.jsonl")
    with open(path) as f:
        return [{"step": r["step"], "valid_loss": r["valid_loss"]}
                for r in map(json.loads, f) if "valid_loss" in r]


def stage_summary(run: str, stage: str) -> dict:
    with open(os.path.join(run, stage, "ckpt", "state.json")) as f:
        st = json.load(f)
    v = st.get("valid", {})
    return {"steps": st["step"], "cap": st["config"]["steps"], "best_step": v.get("best_step"),
            "best_valid_loss": v.get("best"), "stopped_early": bool(v.get("stopped")),
            "lr": st["config"]["lr"], "max_tokens": st["config"]["max_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--from", dest="src", default="runs/src", help="v2 run with θ0 (base/)")
    ap.add_argument("--base-cap", type=int, default=6000)
    ap.add_argument("--ft-cap", type=int, default=400)
    ap.add_argument("--joint-cap", type=int, default=1000)
    ap.add_argument("--limit", type=int, help="test rows per direction (default: all 1,000)")
    ap.add_argument("--extend", action="store_true", help="the extension experiment (step 5)")
    ap.add_argument("--ext-ft-cap", type=int, default=300)
    ap.add_argument("--ext-cap", type=int, default=400)
    ap.add_argument("--eval-part", choices=["supervised", "zero"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.eval_part:
        return evaluate_part(a.run, a.eval_part, a.limit)
    if a.extend:
        return extension(a)
    run, t = a.run, {}
    tpath = os.path.join(run, "v3-timings.json")
    if os.path.exists(tpath):
        with open(tpath) as f:
            t = json.load(f)

    def save_t() -> None:
        with open(tpath, "w") as f:
            json.dump(t, f, indent=1)

    if not os.path.exists(os.path.join(run, "run.json")):
        os.makedirs(run, exist_ok=True)
        for f in ("run.json", "spm.model", "spm.vocab"):
            shutil.copyfile(os.path.join(a.src, f), os.path.join(run, f))
        shutil.copytree(os.path.join(a.src, "base"), os.path.join(run, "base"))
        log(f"θ0 copied from {a.src}/base (step 1600)")
    R = ["--run", run]
    if not done(run, "base", a.base_cap):
        sh([TORCHRUN + ["train"] + R + COMMON +
            ["--steps", str(a.base_cap), "--max-tokens", "2048", "--lr", "2e-3", "--warmup",
             "200", "--validate-every", "100"]], "base (continued)", t)
        save_t()
    if not all(done(run, f"ft/{d}", a.ft_cap) for d in SUPERVISED):
        sh([TORCHRUN + ["finetune"] + R + COMMON +
            ["--pair", "all", "--steps", str(a.ft_cap)] + FT], "fine-tunes", t)
        save_t()
    for alpha in (0.5, 0.7):
        if not os.path.exists(os.path.join(run, f"masks-a{alpha}.safetensors")):
            sh([CLI + ["prune"] + R + ["--alpha", str(alpha), "--out",
                                       f"masks-a{alpha}.safetensors"]], f"prune α={alpha}", t)
    joints = [CLI + ["joint"] + R + COMMON + JOINT +
              ["--steps", str(a.joint_cap), "--masks", f"masks-a{x}.safetensors",
               "--out", f"joint-a{x}"] for x in (0.5, 0.7)]
    if not all(done(run, f"joint-a{x}", a.joint_cap) for x in (0.5, 0.7)):
        sh(joints, "joint α=0.5 | joint α=0.7", t)
        save_t()
    loss = {x: stage_summary(run, f"joint-a{x}")["best_valid_loss"] for x in (0.5, 0.7)}
    best = min(loss, key=loss.get)
    with open(os.path.join(run, "v3-alpha.json"), "w") as f:
        json.dump({"alpha": best, "valid_loss": loss}, f)
    log(f"α chosen on validation loss: {best} ({loss})")
    if not os.path.exists(os.path.join(run, "masks-shared.safetensors")):
        sh([CLI + ["prune"] + R + ["--alpha", str(best), "--shared-from", "base", "--out",
                                   "masks-shared.safetensors"]], "prune shared", t)
    if not (done(run, "dense", a.joint_cap) and done(run, "joint-shared", a.joint_cap)):
        sh([CLI + ["train"] + R + COMMON + JOINT +
            ["--steps", str(a.joint_cap), "--init", "base", "--out", "dense"],
            CLI + ["joint"] + R + COMMON + JOINT +
            ["--steps", str(a.joint_cap), "--masks", "masks-shared.safetensors", "--out",
             "joint-shared"]], "dense | joint shared", t)
        save_t()
    parts = {p: os.path.join(run, f"v3-eval-{p}.json") for p in ("supervised", "zero")}
    todo = [p for p, f in parts.items() if not os.path.exists(f)]
    if todo:
        lim = ["--limit", str(a.limit)] if a.limit else []
        sh([[sys.executable, __file__, run, "--eval-part", p] + lim for p in todo],
           "evaluate " + " | ".join(todo), t)
        save_t()
    report(run, best, loss, t)


def report(run_dir: str, alpha: float, alpha_loss: dict, timings: dict) -> None:
    from lass_sparse.lass import pipeline as P
    from lass_sparse.masks import MaskBank, atomic_write

    ev = {}
    for p in ("supervised", "zero"):
        with open(os.path.join(run_dir, f"v3-eval-{p}.json")) as f:
            ev[p] = json.load(f)
    hs, hz = ev["supervised"]["hyps"], ev["zero"]["hyps"]

    def pick(h: dict, names: tuple) -> dict:
        return {k: h[k] for k in names}

    sig = {"supervised": P.significance(hs, "dense", SUPERVISED),
           "LaSS vs shared": P.significance(pick(hs, ("shared", "LaSS")), "shared", SUPERVISED),
           "zero_shot": P.significance(hz, "dense", ZERO)}
    bank = MaskBank.load(os.path.join(run_dir, f"masks-a{alpha}.safetensors"))
    cross = [bank.similarity(x, y) for x in SUPERVISED for y in SUPERVISED if x != y]
    stages = ["base"] + [f"ft/{d}" for d in SUPERVISED] + ["joint-a0.5", "joint-a0.7",
                                                            "dense", "joint-shared"]
    out = {"alpha": alpha, "alpha_valid_loss": alpha_loss,
           "stages": {s: stage_summary(run_dir, s) for s in stages},
           "curves": {s: curve(run_dir, s) for s in stages},
           "results": {"supervised": ev["supervised"]["results"],
                       "zero_shot": ev["zero"]["results"]},
           "significance": sig, "timings_s": timings,
           "similarity": {"cross_direction_mean": sum(cross) / len(cross),
                          "cross_direction_max": max(cross)}}
    atomic_write(os.path.join(run_dir, "v3.json"), json.dumps(out, indent=1).encode())
    log(f"wrote {run_dir}/v3.json")


if __name__ == "__main__":
    main()
