"""``lass-sparse reproduce``: the paper's experiments on a corpus, one command (issue: reproduce).

Writes ``OUT/reproduction.md`` + ``.json`` + PNGs:

1. Table 1 analogue — BLEU / chrF per direction for the dense multilingual baseline (trained as
   many steps as LaSS's base + joint phases), LaSS, and LaSS with random masks at the same α;
   averages and win ratios; plus α ∈ ``--alphas`` on a subset of directions (Fig. 7 trend).
2. Zero-shot (Table 3 analogue) — X→Y among ``--zero-shot`` languages on the multi-way test set:
   BLEU and translation accuracy, baseline vs LaSS with merged masks.
3. Extension (Fig. 3 analogue) — a base trained without ``--held-out`` (e.g. ar); the new pair is
   added by dense continued training (baseline) or by ``extend`` (LaSS, and ``--strict``); BLEU of
   the new pair and of the others against steps.
4. Similarity heatmap (Fig. 4) and per-layer similarity (Fig. 5/6).

Every stage checkpoints into ``--run``; rerunning the command resumes. ``--scale`` multiplies every
step count (a quick smoke run uses e.g. 0.02).
"""

from __future__ import annotations

import json
import os
import time

from ..masks import atomic_write

DEFAULT_STEPS = {"base": 8000, "finetune": 300, "joint": 4000, "extend_ft": 300,
                 "extend": 1500, "extend_eval_every": 500}


def _steps(scale: float) -> dict:
    return {k: max(1, int(v * scale)) for k, v in DEFAULT_STEPS.items()}


def run_reproduction(args) -> int:
    from . import pipeline as P
    from .plots import layer_similarity_plot, similarity_heatmap

    t0 = time.time()
    st = _steps(args.scale)
    kw = {"progress": not args.quiet, "amp": args.amp, "batch_size": args.batch_size}
    os.makedirs(args.out, exist_ok=True)
    run = P.prepare(args.run, args.corpus, args.config, args.vocab_size, seed=args.seed)
    dirs = run.directions
    ev = {"limit": args.limit, "beam": args.beam, "progress": not args.quiet}
    report: dict = {"config": args.config, "steps": st, "alpha": args.alpha, "seed": args.seed,
                    "corpus": run.info["corpus"], "directions": dirs}

    # 1. base -> fine-tune -> prune -> joint; baseline = base continued densely, same steps
    P.train(run, st["base"], out="base", **kw)
    for d in dirs:
        P.finetune(run, d, st["finetune"], init="base", **kw)
    bank = P.prune(run, args.alpha, out="masks.safetensors")
    P.prune(run, args.alpha, out="masks-random.safetensors", random=True, seed=args.seed)
    P.joint(run, "masks.safetensors", st["joint"], init="base", out="joint", **kw)
    P.joint(run, "masks-random.safetensors", st["joint"], init="base", out="joint-random", **kw)
    P.train(run, st["joint"], out="baseline", init="base", **kw)
    systems = {"baseline": ("baseline", None), "LaSS": ("joint", "masks.safetensors"),
               "random": ("joint-random", "masks-random.safetensors")}
    zero = [f"{a}-{b}" for a in args.zero_shot for b in args.zero_shot if a != b]
    res = P.evaluate(run, systems, dirs + zero, **ev)
    report["main"] = res
    # alpha sweep on a subset
    sweep = {}
    subset = [d for d in dirs if d.split("-")[1] in args.alpha_langs or
              d.split("-")[0] in args.alpha_langs]
    for a in args.alphas:
        if a == args.alpha:
            sweep[a] = {d: res["LaSS"][d] for d in subset}
            continue
        name = f"masks-a{a}.safetensors"
        P.prune(run, a, directions=subset, out=name)
        P.joint(run, name, st["joint"], init="base", out=f"joint-a{a}", directions=subset, **kw)
        sweep[a] = P.evaluate(run, {"LaSS": (f"joint-a{a}", name)}, subset, **ev)["LaSS"]
    report["alpha_sweep"] = {str(a): v for a, v in sweep.items()}

    # 3. extension: base without the held-out pair, then add it three ways
    held = [d for d in dirs if args.held_out in d.split("-")]
    others = [d for d in dirs if d not in held]
    ext: dict = {}
    if held:
        P.train(run, st["base"], out="ext/base", directions=others, **kw)
        for d in others:
            P.finetune(run, d, st["finetune"], init="ext/base", out=f"ext/ft/{d}", **kw)
        P.prune(run, args.alpha, directions=others, out="ext/masks.safetensors",
                ft_prefix="ext/ft")
        P.joint(run, "ext/masks.safetensors", st["joint"], init="ext/base", out="ext/joint",
                directions=others, **kw)
        curves = {"baseline": [], "LaSS": [], "LaSS --strict": []}
        every = st["extend_eval_every"]
        for upto in range(every, st["extend"] + 1, every):
            P.train(run, upto, out="ext/new-baseline", init="ext/joint", directions=held, **kw)
            r = P.evaluate(run, {"baseline": ("ext/new-baseline", None)}, held + others, **ev)
            curves["baseline"].append({"step": upto, **_split_avg(r["baseline"], held)})
        masks = "ext/masks.safetensors"
        for label, strict in (("LaSS", False), ("LaSS --strict", True)):
            cur, prev = masks, "ext/joint"
            for d in held:  # one direction after the other, each its own sub-network
                out = f"ext/{'strict' if strict else 'lass'}/{d}"
                P.extend(run, d, masks=cur, init=prev,
                         ft_steps=st["extend_ft"], steps=st["extend"], strict=strict, out=out,
                         **kw)
                cur, prev = os.path.join(out, "masks.safetensors"), out
            r = P.evaluate(run, {label: (prev, cur)}, held + others, **ev)
            curves[label].append({"step": st["extend"], **_split_avg(r[label], held)})
        ext = curves
    report["extension"] = ext

    # 4. similarity figures
    pngs = {"similarity": similarity_heatmap(bank, dirs, os.path.join(args.out, "similarity.png")),
            "layers": layer_similarity_plot(bank, [(dirs[0], d) for d in dirs[1:4]],
                                            os.path.join(args.out, "layer_similarity.png"))}
    report["similarity_total"] = {f"{a}|{b}": bank.similarity(a, b) for a in dirs for b in dirs}
    report["wall_s"] = time.time() - t0
    atomic_write(os.path.join(args.out, "reproduction.json"), json.dumps(report, indent=1).encode())
    atomic_write(os.path.join(args.out, "reproduction.md"), _markdown(report, dirs, zero, pngs,
                                                                       args).encode())
    print(f"wrote {args.out}/reproduction.md")
    return 0


def _split_avg(r: dict, held: list[str]) -> dict:
    new = [r[d]["bleu"] for d in held]
    old = [v["bleu"] for d, v in r.items() if d not in held]
    return {"new_bleu": sum(new) / len(new), "others_bleu": sum(old) / max(len(old), 1)}


def _markdown(rep: dict, dirs, zero, pngs, args) -> str:
    from .pipeline import render_table

    lines = ["# LaSS reproduction", "",
             f"Command: `lass-sparse reproduce --corpus {args.corpus} --config {args.config} "
             f"--scale {args.scale} --alpha {args.alpha} --seed {args.seed}`; steps "
             f"{rep['steps']}; wall time {rep['wall_s'] / 3600:.2f} h.", "",
             "## Table 1 analogue (supervised)", "", render_table(rep["main"], dirs, "baseline"),
             "", "## Zero-shot", "", render_table(rep["main"], zero, "baseline"), "",
             "## α sweep (LaSS average BLEU on the subset)", ""]
    for a, r in rep["alpha_sweep"].items():
        lines.append(f"- α = {a}: {sum(v['bleu'] for v in r.values()) / max(len(r), 1):.2f}")
    lines += ["", "## Extension", ""]
    for label, pts in rep["extension"].items():
        for p in pts:
            lines.append(f"- {label} @ {p['step']}: new pair {p['new_bleu']:.2f}, others "
                         f"{p['others_bleu']:.2f}")
    lines += ["", f"Figures: {pngs['similarity']}, {pngs['layers']}", ""]
    return "\n".join(lines)


def add_commands(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's experiments on a corpus (tables + figures)")
    p.add_argument("--corpus", default="demo")
    p.add_argument("--run", default="runs/reproduce")
    p.add_argument("--out", default="results")
    p.add_argument("--config", default="small")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--alpha-langs", nargs="+", default=["de", "zh"])
    p.add_argument("--zero-shot", nargs="+", default=["de", "fr", "es", "ru", "zh", "ar"])
    p.add_argument("--held-out", default="ar")
    p.add_argument("--limit", type=int, default=None, help="test sentences per direction")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--amp", default="bf16", choices=["none", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_reproduction)
