"""Reproduction v3 (issue 14): longer stages under the early-stopping rule, the released joint lr.

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
    python scripts/reproduction_v3_seed1.py runs/v3             # second seed (optional)
    python scripts/reproduction_v3.py runs/v3 --report results   # reproduction.md/.json, figures
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


def timings(path: str):
    """Wall times per phase, resumed from ``path``; returns (dict, save function)."""
    t: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            t = json.load(f)

    def save() -> None:
        with open(path, "w") as f:
            json.dump(t, f, indent=1)

    return t, save


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
    elif part == "random":
        systems, dirs = {"random": ("joint-random", "masks-random.safetensors")}, SUPERVISED
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
    ap.add_argument("--scratch", action="store_true",
                    help="train θ0 from scratch in RUN instead of continuing --from's")
    ap.add_argument("--corpus", default="/work/shared/corpus", help="with --scratch")
    ap.add_argument("--max-train", type=int, default=3000,
                    help="with --scratch: sentence pairs per language pair")
    ap.add_argument("--vocab-size", type=int, default=4000, help="with --scratch")
    ap.add_argument("--base-cap", type=int, default=6000)
    ap.add_argument("--ft-cap", type=int, default=400)
    ap.add_argument("--joint-cap", type=int, default=1000)
    ap.add_argument("--limit", type=int, help="test rows per direction (default: all 1,000)")
    ap.add_argument("--extend", action="store_true", help="the extension experiment (step 5)")
    ap.add_argument("--ext-ft-cap", type=int, default=300)
    ap.add_argument("--ext-cap", type=int, default=400)
    ap.add_argument("--report", metavar="DIR", help="write DIR/reproduction.md (+ .json, figures) "
                    "from the finished run; DIR/reproduction-discussion.md is appended")
    ap.add_argument("--random-control", action="store_true",
                    help="also train and evaluate random masks at the chosen α (a control)")
    ap.add_argument("--eval-part", choices=["supervised", "zero", "random"],
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.report:
        return write_report(a.run, a.report)
    if a.eval_part:
        return evaluate_part(a.run, a.eval_part, a.limit)
    if a.extend:
        return extension(a)
    run = a.run
    t, save_t = timings(os.path.join(run, "v3-timings.json"))

    create: list[str] = []
    if a.scratch and not os.path.exists(os.path.join(run, "run.json")):
        # θ0 from scratch in RUN (rank 0 creates the run: tokenizer, run.json)
        create = ["--corpus", a.corpus, "--config", "tiny", "--pairs", "en-de", "en-fr",
                  "en-zh", "--max-train", str(a.max_train), "--vocab-size", str(a.vocab_size),
                  "--langtok", "src", "--mask-output-proj"]
        log(f"θ0 from scratch: {a.max_train} sentence pairs per language pair")
    elif not os.path.exists(os.path.join(run, "run.json")):
        os.makedirs(run, exist_ok=True)
        for f in ("run.json", "spm.model", "spm.vocab"):
            shutil.copyfile(os.path.join(a.src, f), os.path.join(run, f))
        shutil.copytree(os.path.join(a.src, "base"), os.path.join(run, "base"))
        log(f"θ0 copied from {a.src}/base (step 1600)")
    R = ["--run", run]
    if not done(run, "base", a.base_cap):
        sh([TORCHRUN + ["train"] + R + create + COMMON +
            ["--steps", str(a.base_cap), "--max-tokens", "2048", "--lr", "2e-3", "--warmup",
             "200", "--validate-every", "100"]], "base" if a.scratch else "base (continued)", t)
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
    if a.random_control:  # random masks at the chosen α, trained like LaSS (one process)
        if not os.path.exists(os.path.join(run, "masks-random.safetensors")):
            sh([CLI + ["prune"] + R + ["--alpha", str(best), "--random", "--out",
                                       "masks-random.safetensors"]], "prune random", t)
        if not done(run, "joint-random", a.joint_cap):
            sh([CLI + ["joint"] + R + COMMON + JOINT +
                ["--steps", str(a.joint_cap), "--masks", "masks-random.safetensors", "--out",
                 "joint-random"]], "joint random", t)
            save_t()
        if not os.path.exists(os.path.join(run, "v3-eval-random.json")):
            sh([[sys.executable, __file__, run, "--eval-part", "random"]], "evaluate random", t)
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


def _curves_png(v: dict, ext: dict | None, out_png: str) -> str:
    """Validation loss per stage: θ0 (v2's steps, then continued), fine-tunes, joint stages."""
    from lass_sparse.lass.plots import _plt, _save

    plt = _plt()
    curves = dict(v["curves"], **(ext["curves"] if ext else {}))
    groups = {"θ0 (base)" if "base" in v["timings_s"] else
              "θ0 (base; v2 to step 1600, then continued)": ["base"],
              "fine-tunes (from the best θ0)": [s for s in curves if "/ft" in s or
                                                s.startswith("ft/")],
              "joint stages (from the best θ0; extension from LaSS)":
                  [s for s in curves if s.startswith(("joint", "dense", "extend-"))
                   and "/ft" not in s]}
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for ax, (title, stages) in zip(axes, groups.items()):
        for st in stages:
            pts = curves.get(st) or []
            if pts:
                ax.plot([q["step"] for q in pts], [q["valid_loss"] for q in pts], lw=1,
                        label=st, marker="." if len(pts) < 30 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step of the stage")
        ax.set_ylabel("label-smoothed CE (validation, 200 rows/direction)")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(plt, fig, out_png)


def _avg(res: dict, system: str, dirs: list[str], metric: str) -> float:
    return sum(res[system][d][metric] for d in dirs) / len(dirs)


def _pooled_row(name: str, sig: dict) -> str:
    b = sig["pooled"]["bleu"]
    lo, hi = b["delta_ci95"]
    wins = sum(t["bleu"]["delta"] > 0 for t in sig["directions"].values())
    signif = sum(t["bleu"]["p_value"] < 0.05 and t["bleu"]["delta"] > 0
                 for t in sig["directions"].values())
    n = len(sig["directions"])
    return (f"| {name} | {b['delta']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {b['p_value']:.3f} | "
            f"{wins}/{n} | {signif}/{n} |")


def _random_rows(run_dir: str, v: dict) -> list[str]:
    """The random-mask control (``--random-control``), where it ran: BLEU and paired tests."""
    from lass_sparse.lass import pipeline as P

    path = os.path.join(run_dir, "v3-eval-random.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rnd = json.load(f)
    with open(os.path.join(run_dir, "v3-eval-supervised.json")) as f:
        hs = json.load(f)["hyps"]
    h = {"random": rnd["hyps"]["random"], "dense": hs["dense"], "LaSS": hs["LaSS"]}
    vs_dense = P.significance({k: h[k] for k in ("dense", "random")}, "dense", SUPERVISED)
    vs_lass = P.significance({k: h[k] for k in ("random", "LaSS")}, "random", SUPERVISED)
    bleu = _avg(rnd["results"], "random", SUPERVISED, "bleu")
    st = stage_summary(run_dir, "joint-random")
    return [_pooled_row("random vs dense", vs_dense["random"]),
            _pooled_row("LaSS vs random", vs_lass["LaSS"]), "",
            f"`random` (`--random-control`): random masks at α={v['alpha']} for every direction, "
            f"trained like LaSS ({_ended(st)} at step {st['steps']}, best {st['best_step']}, "
            f"validation loss {st['best_valid_loss']:.4f}); average BLEU {bleu:.2f}."]


def _ended(st: dict) -> str:
    if st["stopped_early"]:
        return "stopped by the rule"
    if st["steps"] >= st["cap"]:
        return "reached its cap"
    return "stopped by hand, not converged,"


def _header(run_dir: str, v: dict, ext: dict | None, n_test: int) -> list[str]:
    """Title and protocol of the report, from the run's run.json, stages and timings."""
    with open(os.path.join(run_dir, "run.json")) as f:
        info = json.load(f)
    name = os.path.basename(os.path.normpath(run_dir))
    scratch = "base" in v["timings_s"]  # θ0 trained in this run ("base (continued)": from v2)
    commit = "c8197b0"
    if os.path.exists(os.path.join(run_dir, "commit.txt")):
        with open(os.path.join(run_dir, "commit.txt")) as f:
            commit = f.read().strip()
    st = v["stages"]
    caps = (f"--base-cap {st['base']['cap']} --ft-cap {st['ft/en-de']['cap']} --joint-cap "
            f"{st['dense']['cap']}")
    ext_caps = ""
    if ext:
        ext_caps = (f" --ext-ft-cap {ext['stages']['extend-paper/ft/de-fr']['cap']} --ext-cap "
                    f"{ext['stages']['extend-paper']['cap']}")
    s1 = ""
    if os.path.exists(os.path.join(run_dir, "v3-seed1.json")):
        with open(os.path.join(run_dir, "v3-seed1.json")) as f:
            s1st = json.load(f)["stages"]
        s1 = f" --ft-cap {s1st['ft-s1/en-de']['cap']} --joint-cap {s1st['dense-s1']['cap']}"
    m = info["model"]
    if scratch:
        title = (f"# LaSS reproduction {name}: every stage to its stopping rule, the released "
                 "recipe, controls and significance")
        theta0 = ("- **θ0**: trained from scratch in this run (lr 2e-3, 200 warm-up steps, "
                  "inverse sqrt) as 2 DDP ranks of 2,048 tokens (a 4,096-token global batch).")
        rnd = " --random-control" * os.path.exists(os.path.join(run_dir, "v3-eval-random.json"))
        how = [f"python scripts/reproduction_v3.py runs/{name} --scratch --max-train "
               f"{info['max_train']} --vocab-size {m['vocab_size']} {caps}{rnd}"]
        origin = ["  Every step resumes from its checkpoints."]
    else:
        title = ("# LaSS reproduction v3: longer stages, the released joint lr, the extension "
                 "experiment")
        theta0 = ("- **θ0**: the v2 main run's base (lr 2e-3, 200 warm-up steps, inverse sqrt) "
                  "continued from its step 1,600 with the same schedule as 2 DDP ranks of 2,048 "
                  "tokens (the same 4,096-token global batch).")
        how = [f"python scripts/reproduction_v3.py runs/{name} --from runs/src {caps}"]
        origin = ["  `runs/src` is the v2 run (`lass-sparse recipe variant --run runs/src "
                  "--langtok src --controls ...`, see reproduction-v2.md); only its θ0 checkpoint "
                  "and tokenizer are used. Every step resumes from its checkpoints."]
    if ext:
        how.append(f"python scripts/reproduction_v3.py runs/{name} --extend{ext_caps}  # beside it")
    if s1:
        how.append(f"python scripts/reproduction_v3_seed1.py runs/{name}{s1}  # second seed, after")
    how += [f"python scripts/reproduction_v3.py runs/{name} --report results"]
    return [
        title, "",
        f"Generated by `python scripts/reproduction_v3.py runs/{name} --report results` from the "
        "run below; the discussion at the end is hand-written "
        "(`results/reproduction-discussion.md`).", "",
        "## Protocol", "",
        f"- **Data**: ../shared/corpus, pairs {', '.join(info['pairs'])} (both directions; the "
        f"first {info['max_train']:,} training sentence pairs of each). Validation: the first 200 "
        f"rows of valid.tsv.gz per direction. Test: {n_test} rows of test.tsv.gz per direction, "
        "the same rows for every system; beam 4.",
        f"- **Model** `{info['config_name']}` (d={m['d_model']}, {m['enc_layers']}+"
        f"{m['dec_layers']} layers, FFN {m['ffn']}, {m['vocab_size']:,} SentencePiece pieces, "
        f"dropout {m['dropout']}), source-language tag on the encoder, masked tied output "
        "projection, bf16 autocast, 4,096-token batches.",
        theta0,
        "- **Fine-tunes** from the best θ0: lr 1e-3, 20 warm-up steps, dropout 0.3, one per "
        "direction.",
        "- **Joint stages** from the best θ0, optimizer and schedule reset: LaSS at α ∈ {0.5, "
        "0.7}, the dense continuation and the shared-mask control, all at the released peak lr "
        "5e-4 (200 warm-up steps, inverse sqrt). α is chosen on validation loss.",
        "- **Stopping rule** for every stage: validation every 100 (θ0) / 30 (fine-tune) / 50 "
        "(joint) steps, stop after 4 validations without improvement, best checkpoint kept; caps "
        f"θ0 {st['base']['cap']}, fine-tune {st['ft/en-de']['cap']}, joint "
        f"{st['dense']['cap']} steps (a safety bound: a stage that reaches it is reported as "
        "not converged).",
        "- **Significance**: sacrebleu's paired bootstrap (1,000 samples) per direction, and "
        "pooled over directions (average BLEU), with the 95% CI of the difference. Seed 0 for "
        "the whole pass; a second seed of the fine-tune → joint pass and the dense "
        "continuation where `v3-seed1.json` exists (section \"Second seed\").",
        f"- **How it ran**: the fixed commit {commit}, a separate clone with its own venv, 2 "
        "cores:", "", "```bash", *how, "```", "", *origin, ""]


def write_report(run_dir: str, out_dir: str) -> None:
    """results/reproduction.md (+ .json, curves, similarity figures) from v3.json and
    v3-extend.json; the hand-written discussion (DIR/reproduction-discussion.md) is appended."""
    from lass_sparse.lass import pipeline as P
    from lass_sparse.lass.plots import layer_similarity_plot, similarity_heatmap
    from lass_sparse.masks import MaskBank, atomic_write

    with open(os.path.join(run_dir, "v3.json")) as f:
        v = json.load(f)
    ext = None
    if os.path.exists(os.path.join(run_dir, "v3-extend.json")):
        with open(os.path.join(run_dir, "v3-extend.json")) as f:
            ext = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    a = v["alpha"]
    res, zres = v["results"]["supervised"], v["results"]["zero_shot"]
    sig = v["significance"]
    _curves_png(v, ext, os.path.join(out_dir, "curves.png"))
    bank = MaskBank.load(os.path.join(run_dir, f"masks-a{a}.safetensors"))
    similarity_heatmap(bank, SUPERVISED, os.path.join(out_dir, "similarity.png"))
    layer_similarity_plot(bank, [("en-fr", "en-de"), ("en-fr", "en-zh"), ("fr-en", "de-en"),
                                 ("fr-en", "zh-en")], os.path.join(out_dir,
                                                                   "layer_similarity.png"))
    n_test = res["dense"][SUPERVISED[0]]["n"]
    T = v["timings_s"]
    L = _header(run_dir, v, ext, n_test)
    L += ["", "## Convergence", "", "![validation curves](curves.png)", "",
         "| stage | steps run | cap | best step | best valid loss | stopped by the rule |",
         "|---|---|---|---|---|---|"]
    stages = dict(v["stages"], **(ext["stages"] if ext else {}))
    for st, r in stages.items():
        L.append(f"| {st} | {r['steps']} | {r['cap']} | {r['best_step']} | "
                 f"{r['best_valid_loss']:.4f} | {'yes' if r['stopped_early'] else 'no (cap)'} |")
    L += ["", "α chosen on validation loss: " + ", ".join(
        f"α={x}: {y:.4f}" for x, y in v["alpha_valid_loss"].items()) + f" → **α={a}**.", "",
        "Wall time per phase of this script (2 cores): " + ", ".join(
            f"{k} {t / 60:.1f} min" for k, t in T.items()) + (
            "; extension (third process): " + ", ".join(
                f"{k} {t / 60:.1f} min" for k, t in ext["timings_s"].items()) if ext else "")
        + ".", "",
        "## Supervised directions", "",
        "`theta0` = the converged base; `dense` = θ0 trained on densely under the joint stage's "
        "lr, cap and stopping rule (the fair baseline); `LaSS` = masked joint training; "
        "`shared` = θ0's own magnitude mask for every direction (pruned, not language-specific), "
        "trained the same way.", "",
        P.render_table(res, SUPERVISED, "dense"), "",
        "| paired test, pooled over the 6 directions | Δ BLEU | 95% CI of Δ | p | directions "
        "better | better with p < 0.05 |", "|---|---|---|---|---|---|",
        _pooled_row("LaSS vs dense", sig["supervised"]["LaSS"]),
        _pooled_row("LaSS vs shared", sig["LaSS vs shared"]["LaSS"]),
        _pooled_row("shared vs dense", sig["supervised"]["shared"]),
        _pooled_row("θ0 vs dense", sig["supervised"]["theta0"]), *_random_rows(run_dir, v), "",
        P.render_significance(sig["supervised"], "dense"),
        P.render_significance(sig["LaSS vs shared"], "shared"),
        "## Zero-shot", "",
        f"Average over {len(ZERO)} zero-shot directions ({', '.join(ZERO)}); ACC = share of "
        "outputs in the target language (langid); LaSS uses merged X→en encoder / en→Y decoder "
        "masks.", "", "| system | BLEU | ACC | off-target |", "|---|---|---|---|"]
    for name in zres:
        acc = _avg(zres, name, ZERO, "acc")
        L.append(f"| {name} | {_avg(zres, name, ZERO, 'bleu'):.2f} | {acc:.3f} | "
                 f"{1 - acc:.1%} |")
    L += ["", P.render_significance(sig["zero_shot"], "dense")]
    if ext:
        L += _extension_section(ext, v, run_dir)
    seed1 = None
    if os.path.exists(os.path.join(run_dir, "v3-seed1.json")):
        with open(os.path.join(run_dir, "v3-seed1.json")) as f:
            seed1 = json.load(f)
        L += _seed1_section(seed1, v)
    L += ["## Mask diagnostics", "",
          f"- Cross-direction similarity of the α={a} masks (LaSS Eq. 2): mean "
          f"{v['similarity']['cross_direction_mean']:.4f}, max "
          f"{v['similarity']['cross_direction_max']:.4f}."]
    if seed1:
        same = seed1["similarity"]["same_direction_across_seeds"]
        c1 = seed1["similarity"]["cross_direction_seed1"]
        L += [f"- Same direction, seed 0 vs seed 1 (both α={a}): mean "
              f"{sum(same.values()) / len(same):.4f} (" + ", ".join(
                  f"{d} {x:.3f}" for d, x in same.items()) + f"); cross-direction within "
              f"seed 1: mean {c1['mean']:.4f}, max {c1['max']:.4f}."]
    L += ["- ![similarity](similarity.png) (colour scale over the off-diagonal values) and "
          "per layer: ![layer similarity](layer_similarity.png)", ""]
    run_name = os.path.basename(os.path.normpath(run_dir))
    L += _models_section(os.path.join(out_dir, "models"), f"runs/{run_name}", a)
    disc = os.path.join(out_dir, "reproduction-discussion.md")
    if os.path.exists(disc):
        with open(disc) as f:
            L += [f.read().rstrip(), ""]
    atomic_write(os.path.join(out_dir, "reproduction.md"), "\n".join(L).encode())
    slim = {k: x for k, x in v.items()}
    if seed1:
        slim["seed1"] = seed1
    if ext:
        slim["extension"] = {k: x for k, x in ext.items() if not k.startswith("hyps")}
    atomic_write(os.path.join(out_dir, "reproduction.json"), json.dumps(slim, indent=1).encode())
    log(f"wrote {out_dir}/reproduction.md")


def _seed1_section(s1: dict, v: dict) -> list[str]:
    """The second seed (scripts/reproduction_v3_seed1.py): fine-tune → prune → joint and the
    dense continuation again from the same θ0 with seed 1."""
    res, sig = s1["results"], s1["significance"]
    systems = ("dense", "LaSS", "dense-s1", "LaSS-s1")

    def avg(name: str) -> float:
        return _avg(res, name, SUPERVISED, "bleu")

    L = ["## Second seed", "",
         "`scripts/reproduction_v3_seed1.py` (same fixed commit) repeated the "
         "fine-tunes, pruning at the chosen α, the LaSS joint stage and the dense continuation "
         "from the same θ0 with `--seed 1` (data order, dropout), same recipe, caps and stopping "
         "rule; both evaluated on the same test rows. Wall time: " + ", ".join(
             f"{k} {t / 60:.1f} min" for k, t in s1["timings_s"].items()) + ".", "",
         "| stage (seed 1) | steps run | cap | best step | best valid loss | stopped by the "
         "rule |", "|---|---|---|---|---|---|"]
    for st, r in s1["stages"].items():
        L.append(f"| {st} | {r['steps']} | {r['cap']} | {r['best_step']} | "
                 f"{r['best_valid_loss']:.4f} | {'yes' if r['stopped_early'] else 'no (cap)'} |")
    L += ["", "| system | average BLEU (6 directions) |", "|---|---|"]
    L += [f"| {n} | {avg(n):.2f} |" for n in systems if n in res]
    b = s1["pooled_over_seeds"]["bleu"]
    lo, hi = b["delta_ci95"]
    L += ["", "| paired test | Δ BLEU | 95% CI of Δ | p | directions better | better with "
          "p < 0.05 |", "|---|---|---|---|---|---|",
          _pooled_row("seed 0: LaSS vs dense", v["significance"]["supervised"]["LaSS"]),
          _pooled_row("seed 1: LaSS-s1 vs dense-s1", sig["LaSS-s1 vs dense-s1"]["LaSS-s1"]),
          _pooled_row("LaSS-s1 vs seed 0's dense", sig["LaSS-s1 vs dense"]["LaSS-s1"]),
          f"| both seeds pooled (12 seed × direction sets): LaSS vs dense | {b['delta']:+.2f} | "
          f"[{lo:+.2f}, {hi:+.2f}] | {b['p_value']:.3f} | | |", ""]
    z = s1.get("zero_shot")
    if z:
        L += [f"Zero-shot, seed 1 (the {len(ZERO)} directions of the zero-shot section, merged "
              "masks):", "", "| system | BLEU | ACC | off-target |", "|---|---|---|---|"]
        for name in z:
            acc = _avg(z, name, ZERO, "acc")
            L.append(f"| {name} | {_avg(z, name, ZERO, 'bleu'):.2f} | {acc:.3f} | {1 - acc:.1%} |")
        zs = sig["zero-shot: LaSS-s1 vs dense-s1"]["LaSS-s1"]
        L += ["", "| paired test | Δ BLEU | 95% CI of Δ | p | directions better | better with "
              "p < 0.05 |", "|---|---|---|---|---|---|",
              _pooled_row("zero-shot, seed 1: LaSS-s1 vs dense-s1", zs), ""]
    return L


def _models_section(folder: str, run: str, alpha: float) -> list[str]:
    """The published models (``lass-sparse recipe publish``): files, sizes, sha256."""
    import hashlib

    if not os.path.exists(os.path.join(folder, "run.json")):
        return []
    rows, total = [], 0
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                data = fh.read()
            total += len(data)
            rows.append(f"| `{os.path.relpath(path, folder)}` | {len(data) / 1e6:.2f} MB | "
                        f"`{hashlib.sha256(data).hexdigest()}` |")
    return ["## Published models", "",
            "`results/models/` is a run folder with θ0 (`theta0`), the dense baseline (`dense`) "
            "and LaSS (`lass`), each the best checkpoint on validation stored as bf16 "
            "safetensors, plus the compact LaSS mask bank, the SentencePiece model and run.json "
            f"({total / 1e6:.1f} MB in all). Made by `lass-sparse recipe publish --run {run} "
            f"--out results/models --alpha {alpha}`. Re-evaluate them on the test set with:", "",
            "```bash",
            "lass-sparse evaluate --run results/models --system theta0=theta0 \\",
            "  --system lass=lass@masks.safetensors --baseline dense \\",
            "  --test ../shared/corpus/test.tsv.gz --directions en-de de-en en-fr fr-en en-zh "
            "zh-en --bootstrap 1000 --out results/models/eval",
            "```", "",
            "The weights are bf16 copies of the fp32 checkpoints scored above, so scores can "
            "differ in the last digit.", "",
            "| file | size | sha256 |", "|---|---|---|", *rows, ""]


def _extension_section(ext: dict, v: dict, run_dir: str) -> list[str]:
    """New pair de-fr/fr-de: its BLEU before (zero-shot) and after; old pairs before/after."""
    from lass_sparse.lass import pipeline as P

    with open(os.path.join(run_dir, "v3-eval-supervised.json")) as f:
        old_hyps = json.load(f)["hyps"]
    ho = dict(ext["hyps_old"], LaSS=old_hyps["LaSS"])
    sig_old = P.significance(ho, "LaSS", SUPERVISED)
    sig_new = P.significance(ext["hyps_new"], "LaSS (zero-shot)", NEW)
    ro, rn = ext["results_old"], ext["results_new"]
    lass = v["results"]["supervised"]["LaSS"]
    L = ["## Extension: a new pair from θ0 (released recipe)", "",
         "de-fr and fr-de were never trained in θ0 or LaSS (zero-shot there). Their training rows "
         f"({ext['train_examples']['de-fr']:,} per direction) are pivoted through English "
         "from train.en-de and train.en-fr. Both directions are fine-tuned from θ0, pruned at "
         f"α={ext['alpha']}, and only their sub-networks of the LaSS model are trained (lr 5e-4, "
         "the joint stage's rule). Paper mode updates the new masks and the shared (unmasked) "
         "parameters; `--strict` updates only weights outside every old pair's mask and "
         "freezes the shared ones.", "",
         "| new direction | θ0 (zero-shot) | LaSS (zero-shot) | extended, paper | extended, "
         "strict |", "|---|---|---|---|---|"]
    for d in NEW:
        L.append(f"| {d} | " + " | ".join(
            f"{rn[s][d]['bleu']:.1f}" for s in ("theta0", "LaSS (zero-shot)", "extend-paper",
                                                 "extend-strict")) + " |")
    L += ["", "| old direction | LaSS | after extension, paper | Δ | after, strict | Δ |",
          "|---|---|---|---|---|---|"]
    for d in SUPERVISED:
        b = lass[d]["bleu"]
        p, s_ = ro["extend-paper"][d]["bleu"], ro["extend-strict"][d]["bleu"]
        L.append(f"| {d} | {b:.2f} | {p:.2f} | {p - b:+.2f} | {s_:.2f} | {s_ - b:+.2f} |")
    ch = ext["old_pair_max_abs_weight_change"]
    L += ["", f"- Largest change of any old pair's effective weight (W ⊙ M over every old mask, "
          f"and every shared parameter): paper mode {ch['paper']:.3g}, strict "
          f"{ch['strict']:.3g}.",
          "", P.render_significance(sig_old, "LaSS"),
          P.render_significance(sig_new, "LaSS (zero-shot)")]
    return L


if __name__ == "__main__":
    main()
