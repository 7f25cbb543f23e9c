"""``lass-sparse reproduce``: the paper's experiments on a corpus, one command (issue: reproduce).

Writes ``OUT/reproduction.md`` + ``.json`` + PNGs. The work is split into parts that share the run
folder and can run one after the other (``--part all``, the default) or as concurrent processes on
separate cores (``--part main --threads 1`` next to ``--part ext --threads 1``, then
``--part sweep`` and ``--part report``):

``main``  — Table 1 analogue: BLEU / chrF / ACC per direction for the dense multilingual baseline
            (trained as many steps as LaSS's base + joint phases), LaSS, and LaSS with random masks
            at the same α; plus the zero-shot directions among ``--zero-shot`` (Table 3 analogue,
            merged masks for LaSS).
``sweep`` — α ∈ ``--alphas`` on the directions of ``--alpha-langs``, each α joint-trained from the
            same base for the same steps on that subset (Fig. 7 trend). Needs ``main``'s
            fine-tuned models.
``ext``   — Fig. 3 analogue: a base trained without ``--held-out`` (e.g. ar) goes through the LaSS
            stages; then the new pair (both directions) is added by dense continued training
            (baseline), by ``extend`` (LaSS) and by ``extend --strict``; BLEU of the new pair and of
            the others every ``extend_eval_every`` steps.
``report``— similarity heatmap (Fig. 4) and per-layer similarity (Fig. 5/6), then the markdown.

Every stage checkpoints into ``--run`` and every finished part writes ``RUN/parts/PART.json``, so
rerunning the command resumes where it stopped. ``--steps KEY=N`` overrides a step count and
``--scale`` multiplies all of them (a smoke run uses e.g. ``--scale 0.02``).
"""

from __future__ import annotations

import json
import os
import time

from ..fileio import atomic_write

# The documented CPU run (tiny model, 2 cores, ~2 h with main and ext as two 1-thread processes).
DEFAULT_STEPS = {"base": 2800, "finetune": 50, "joint": 1300, "sweep_joint": 300,
                 "ext_base": 2000, "ext_joint": 1000, "extend_ft": 50, "extend": 600,
                 "extend_eval_every": 200}
PARTS = ("main", "sweep", "ext", "report")

# `--preset gpu`: the paper-like run for one GPU, about 40 min on an H100. Sizing, from the
# measured throughput of the CLI pipeline on an H200
# (benchmarks/results/nvidia-h200-run2-pipeline.log:
# Transformer-base, bf16 autocast, 8,192-token batches: 45.9k tokens/s dense, 47.3k masked,
# about 11k real tokens per step); an H100 assumed no faster: on the full shared corpus (~16M
# tokens an epoch over 16 directions) base 3,500 steps ≈ 38M tokens ≈ 2.4 epochs ≈ 14 min;
# 16 fine-tunes × 120 steps ≈ 21M tokens ≈ 8 min (+ stage start-up); joint, random, shared and
# dense continuation × 800 steps ≈ 35M tokens ≈ 13 min; evaluation of 5 systems on 16 + 6
# directions × 200 test rows, beam 4 ≈ 4 min. The released schedule's lr 5e-4 (inverse sqrt),
# with a warm-up of 1,000 steps for the shorter run. Explicit flags override preset values.
PRESETS = {
    "gpu": {"config": "base", "vocab_size": 16000, "max_tokens": 8192, "lr": 5e-4,
            "warmup": 1000, "steps": ["base=3500", "finetune=120", "joint=800"],
            "limit": 200, "zero_shot": ["de", "fr", "zh"], "part": "main+report",
            "amp": "bf16", "validate_every": 500, "patience": 0,
            "report_name": "reproduction-gpu"},
}
_UNSET = type("_Unset", (), {"__repr__": lambda self: "<unset>"})()
_DEFAULTS: dict = {}  # real defaults of the options a preset may set (parsed as _UNSET)


def _steps(scale: float, overrides: list[str] | None = None) -> dict:
    st = dict(DEFAULT_STEPS)
    for item in overrides or []:
        key, sep, val = item.partition("=")
        if not sep or key not in st or not val.isdigit():
            raise ValueError(f"--steps: expected KEY=N with KEY in {sorted(st)}, got {item!r}")
        st[key] = int(val)
    return {k: max(1, int(v * scale)) for k, v in st.items()}


def _part_path(run, part: str) -> str:
    return run.path("parts", f"{part}.json")


def _load_part(run, part: str) -> dict | None:
    path = _part_path(run, part)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _save_part(run, part: str, data: dict) -> dict:
    os.makedirs(run.path("parts"), exist_ok=True)
    atomic_write(_part_path(run, part), json.dumps(data, indent=1).encode())
    return data


class _Stages:
    """Runs pipeline stages, recording each one's wall time (``RUN/parts/timings.json``)."""

    def __init__(self, run, kw: dict):
        self.run, self.kw = run, kw

    def __call__(self, label: str, fn, *a, train: bool = True, **k):
        """``fn(run, *a, **k)``; training stages (``train=True``) also get the shared options."""
        path = self.run.path("parts", "timings.json")
        t0 = time.time()
        out = fn(self.run, *a, **({**self.kw, **k} if train else k))
        dt = time.time() - t0
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:  # one JSON line per stage call, across processes
            rec = {"stage": label, "seconds": round(dt, 1), "pid": os.getpid()}
            f.write(json.dumps(rec) + "\n")
        return out


def _part_main(run, args, st: dict, S: _Stages, ev: dict) -> dict:
    from . import pipeline as P

    done = _load_part(run, "main")
    if done is not None:
        return done
    dirs = run.directions
    S("base", P.train, st["base"], out="base")
    for d in dirs:
        S(f"finetune {d}", P.finetune, d, st["finetune"], init="base")
    S("prune", P.prune, args.alpha, out="masks.safetensors", train=False)
    S("prune random", P.prune, args.alpha, out="masks-random.safetensors", random=True,
      seed=args.seed, train=False)
    S("prune shared", P.prune, args.alpha, out="masks-shared.safetensors", shared_from="base",
      train=False)
    S("joint", P.joint, "masks.safetensors", st["joint"], init="base", out="joint")
    S("joint random", P.joint, "masks-random.safetensors", st["joint"], init="base",
      out="joint-random")
    S("joint shared", P.joint, "masks-shared.safetensors", st["joint"], init="base",
      out="joint-shared")
    S("baseline", P.train, st["joint"], out="baseline", init="base")
    # θ0 is the paper's baseline; "baseline" (dense, same budget as the joint phase) the fair one
    systems = {"baseline": ("baseline", None), "theta0": ("base", None),
               "LaSS": ("joint", "masks.safetensors"),
               "random": ("joint-random", "masks-random.safetensors"),
               "shared": ("joint-shared", "masks-shared.safetensors")}
    hyps: dict = {}
    res = S("evaluate main", P.evaluate, systems, dirs + _zero(args), **ev, hyps_out=hyps,
            train=False)
    sig = {"supervised": P.significance(hyps, "baseline", dirs, n_samples=args.bootstrap),
           "zero_shot": P.significance(hyps, "baseline", _zero(args), n_samples=args.bootstrap)
           if _zero(args) else {}}
    return _save_part(run, "main", {"results": res, "significance": sig})


def _zero(args) -> list[str]:
    return [f"{a}-{b}" for a in args.zero_shot for b in args.zero_shot if a != b]


def _part_sweep(run, args, st: dict, S: _Stages, ev: dict) -> dict:
    from . import pipeline as P

    done = _load_part(run, "sweep")
    if done is not None:
        return done
    subset = [d for d in run.directions
              if set(d.split("-")) & set(args.alpha_langs)]
    if not subset:
        raise ValueError(f"--alpha-langs {args.alpha_langs}: no direction of the run has them")
    missing = [d for d in subset if not os.path.exists(run.path("ft", d, "ckpt"))]
    if missing:
        raise FileNotFoundError(f"sweep needs the fine-tuned models of {missing}; run "
                                "`--part main` first (or concurrently, until its fine-tuning)")
    sweep = {}
    for a in args.alphas:
        name = f"sweep/masks-a{a}.safetensors"
        S(f"sweep prune α={a}", P.prune, a, directions=subset, out=name, train=False)
        S(f"sweep joint α={a}", P.joint, name, st["sweep_joint"], init="base",
          out=f"sweep/joint-a{a}", directions=subset)
        sweep[str(a)] = S(f"evaluate sweep α={a}", P.evaluate,
                          {"LaSS": (f"sweep/joint-a{a}", name)}, subset, **ev, train=False)["LaSS"]
    return _save_part(run, "sweep", {"directions": subset, "results": sweep})


def _part_ext(run, args, st: dict, S: _Stages, ev: dict) -> dict:
    from . import pipeline as P

    done = _load_part(run, "ext")
    if done is not None:
        return done
    dirs = run.directions
    held = [d for d in dirs if args.held_out in d.split("-")]
    others = [d for d in dirs if d not in held]
    if not held or not others:
        raise ValueError(f"--held-out {args.held_out!r}: need directions with and without it, "
                         f"run has {dirs}")
    S("ext base", P.train, st["ext_base"], out="ext/base", directions=others)
    for d in others:
        S(f"ext finetune {d}", P.finetune, d, st["finetune"], init="ext/base",
          out=f"ext/ft/{d}")
    S("ext prune", P.prune, args.alpha, directions=others, out="ext/masks.safetensors",
      ft_prefix="ext/ft", train=False)
    S("ext joint", P.joint, "ext/masks.safetensors", st["ext_joint"], init="ext/base",
      out="ext/joint", directions=others)
    # the dense baseline gets the same steps as LaSS's joint phase (dense, from the same base)
    S("ext baseline (dense)", P.train, st["ext_joint"], out="ext/baseline", init="ext/base",
      directions=others)
    every, total = st["extend_eval_every"], st["extend"]
    points = sorted({*range(every, total + 1, every), total})
    # step 0: the others as trained; the new pair (no mask yet) with the dense weights
    r0 = {"LaSS": {**S("evaluate ext start", P.evaluate,
                       {"x": ("ext/joint", "ext/masks.safetensors")}, others, **ev,
                       train=False)["x"],
                   **S("evaluate ext start (new pair)", P.evaluate, {"x": ("ext/joint", None)},
                       held, **ev, train=False)["x"]},
          "baseline": S("evaluate ext start (baseline)", P.evaluate,
                        {"x": ("ext/baseline", None)}, dirs, **ev, train=False)["x"]}
    curves: dict = {k: [{"step": 0, **_split_avg(r0["baseline" if k == "baseline" else "LaSS"],
                                                  held)}]
                    for k in ("baseline", "LaSS", "LaSS --strict")}
    per_dir: dict = {k: {} for k in curves}
    for upto in points:
        S(f"ext baseline @{upto}", P.train, upto, out="ext/new-baseline", init="ext/baseline",
          directions=held)
        r = S(f"evaluate ext baseline @{upto}", P.evaluate,
              {"baseline": ("ext/new-baseline", None)}, dirs, **ev, train=False)["baseline"]
        curves["baseline"].append({"step": upto, **_split_avg(r, held)})
        per_dir["baseline"][upto] = r
        for label, strict in (("LaSS", False), ("LaSS --strict", True)):
            out = f"ext/{'strict' if strict else 'lass'}"
            S(f"ext {label} @{upto}", P.extend, held, masks="ext/masks.safetensors",
              init="ext/joint", ft_init="ext/base", ft_steps=st["extend_ft"], steps=upto,
              strict=strict, out=out)
            sys_ = {label: (out, os.path.join(out, "masks.safetensors"))}
            r = S(f"evaluate ext {label} @{upto}", P.evaluate, sys_, dirs, **ev,
                  train=False)[label]
            curves[label].append({"step": upto, **_split_avg(r, held)})
            per_dir[label][upto] = r
    return _save_part(run, "ext", {"held": held, "others": others, "before": r0,
                                   "curves": curves, "final": {k: v[total] for k, v in
                                                               per_dir.items()}})


def _split_avg(r: dict, held: list[str]) -> dict:
    new = [r[d]["bleu"] for d in held]
    old = [v["bleu"] for d, v in r.items() if d not in held]
    acc = [r[d]["acc"] for d in held]
    return {"new_bleu": sum(new) / len(new), "new_acc": sum(acc) / len(acc),
            "others_bleu": sum(old) / max(len(old), 1)}


def _part_report(run, args, st: dict, parts: dict) -> str:
    from . import pipeline as P
    from .plots import extension_plot, layer_similarity_plot, similarity_heatmap

    dirs = run.directions
    bank = P.load_bank(run, "masks.safetensors")
    os.makedirs(args.out, exist_ok=True)
    pre = "" if (getattr(args, "report_name", None) or "reproduction") == "reproduction" \
        else f"{args.report_name}-"
    pngs = {"similarity": similarity_heatmap(bank, dirs, os.path.join(args.out,
                                                                       f"{pre}similarity.png")),
            "layers": layer_similarity_plot(
                bank, [(a, b) for a, b in _layer_pairs(dirs)],
                os.path.join(args.out, f"{pre}layer_similarity.png"))}
    if "ext" in parts:
        pngs["extension"] = extension_plot(parts["ext"]["curves"],
                                           os.path.join(args.out, "extension.png"))
    timings = _timings(run)
    report = {"command": _command(args), "config": run.info["config_name"],
              "model": run.info["model"], "steps": st, "alpha": args.alpha, "seed": args.seed,
              "limit": args.limit, "beam": args.beam, "batch_size": args.batch_size,
              "amp": args.amp, "corpus": run.info["corpus"], "directions": dirs,
              "zero_shot": _zero(args), "parts": parts,
              "similarity_total": {f"{a}|{b}": bank.similarity(a, b) for a in dirs for b in dirs},
              "similarity_by_layer": {f"{a}|{b}": bank.similarity(a, b, by="layer")
                                      for a, b in _layer_pairs(dirs)},
              "similarity_family": _family_stats(bank, dirs),
              "similarity_by_component": {f"{a}|{b}": bank.similarity(a, b, by="component")
                                          for a, b in _layer_pairs(dirs)},
              "stage_seconds": timings}
    name = getattr(args, "report_name", None) or "reproduction"
    atomic_write(os.path.join(args.out, f"{name}.json"), json.dumps(report, indent=1).encode())
    md = _markdown(report, pngs, args)
    atomic_write(os.path.join(args.out, f"{name}.md"), md.encode())
    return os.path.join(args.out, f"{name}.md")


FAMILY = {"en": "Germanic", "de": "Germanic", "fr": "Romance", "es": "Romance", "it": "Romance",
          "pt": "Romance", "ru": "Slavic", "zh": "Sinitic", "ar": "Semitic"}


def _family_stats(bank, dirs: list[str]) -> dict:
    """Mean mask similarity of same-family vs different-family languages (Fig. 4's claim), on
    the en→X side and on the X→en side separately."""
    out = {}
    for side, idx in (("en→X", 1), ("X→en", 0)):
        ds = [d for d in dirs if d.split("-")[1 - idx] == "en"]
        same, diff = [], []
        for i, a in enumerate(ds):
            for b in ds[i + 1:]:
                la, lb = a.split("-")[idx], b.split("-")[idx]
                s = (bank.similarity(a, b) + bank.similarity(b, a)) / 2
                (same if FAMILY.get(la) == FAMILY.get(lb) else diff).append(s)
        out[side] = {"same_family": sum(same) / len(same) if same else None,
                     "n_same": len(same), "different_family": sum(diff) / len(diff) if diff
                     else None, "n_different": len(diff)}
    return out


def _layer_pairs(dirs: list[str]) -> list[tuple[str, str]]:
    """en→X against en→Y for a close and a distant Y, and X→en likewise (Fig. 5/6)."""
    want = [("en-fr", "en-es"), ("en-fr", "en-zh"), ("fr-en", "es-en"), ("fr-en", "zh-en")]
    pairs = [(a, b) for a, b in want if a in dirs and b in dirs]
    return pairs or [(dirs[0], d) for d in dirs[1:4]]


def _timings(run) -> dict:
    path = run.path("parts", "timings.json")
    out: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                out[r["stage"]] = out.get(r["stage"], 0.0) + r["seconds"]
    return out


def _command(args) -> str:
    cmd = (f"lass-sparse reproduce --corpus {args.corpus} --run {args.run} --out {args.out} "
           f"--config {args.config} --vocab-size {args.vocab_size} --alpha {args.alpha} "
           f"--seed {args.seed} --batch-size {args.batch_size} --amp {args.amp} "
           f"--beam {args.beam}")
    cmd += f" --langtok {args.langtok}"
    if getattr(args, "preset", None):
        cmd += f" --preset {args.preset}"
    cmd += " --mask-output-proj" if args.mask_output_proj else " --no-mask-output-proj"
    for opt in ("pairs", "max_train", "max_tokens", "validate_every", "patience",
                "valid_limit", "bootstrap"):
        v = getattr(args, opt, None)
        if v:
            cmd += f" --{opt.replace('_', '-')} " + (" ".join(v) if isinstance(v, list) else str(v))
    if args.limit:
        cmd += f" --limit {args.limit}"
    if args.scale != 1.0:
        cmd += f" --scale {args.scale}"
    for s in args.steps or []:
        cmd += f" --steps {s}"
    return cmd


def _markdown(rep: dict, pngs: dict, args) -> str:
    from .pipeline import render_significance, render_table

    dirs, zero, parts = rep["directions"], rep["zero_shot"], rep["parts"]
    m = rep["model"]
    secs = sum(rep["stage_seconds"].values())
    lines = ["# LaSS reproduction", "",
             f"Command: `{rep['command']}` (parts may run as concurrent processes, see "
             "`lass-sparse reproduce --help`).", "",
             f"Model `{rep['config']}`: d={m['d_model']}, {m['enc_layers']}+{m['dec_layers']} "
             f"layers, FFN {m['ffn']}, vocabulary {m['vocab_size']}; α={rep['alpha']}; steps "
             f"{rep['steps']}; batch {rep['batch_size']} sentences; amp {rep['amp']}; beam "
             f"{rep['beam']}; test sentences per direction: {rep['limit'] or 'all'}. Sum of "
             f"stage wall times {secs / 3600:.2f} h.", ""]
    if "main" in parts:
        res = parts["main"]["results"]
        sig = parts["main"].get("significance", {})
        lines += [f"## Table 1 analogue (supervised, {len(dirs)} directions)", "",
                  "Systems: `theta0` = the multilingual base θ0 (the paper's baseline); "
                  "`baseline` = θ0 trained densely for as many more steps as the joint phase "
                  "(the fair baseline); `LaSS`; `random` = random masks at the same α; "
                  "`shared` = θ0's own magnitude mask for every direction (pruned, not "
                  "language-specific).", "",
                  render_table(res, dirs, "baseline"), ""]
        if sig.get("supervised"):
            lines += [render_significance(sig["supervised"], "baseline"), ""]
        if zero:
            lines += ["## Table 3 analogue (zero-shot, merged masks for LaSS)", "",
                      render_table(res, zero, "baseline"), ""]
            if sig.get("zero_shot"):
                lines += [render_significance(sig["zero_shot"], "baseline"), ""]
    if "sweep" in parts:
        sw = parts["sweep"]
        lines += ["## α sweep (Fig. 7 analogue)", "",
                  f"Joint training on {', '.join(sw['directions'])} only, "
                  f"{rep['steps']['sweep_joint']} steps from the same base, per α.", "",
                  "| α | avg BLEU | avg chrF | avg ACC |", "|---|---|---|---|"]
        for a, r in sw["results"].items():
            n = max(len(r), 1)
            lines.append(f"| {a} | {sum(v['bleu'] for v in r.values()) / n:.2f} | "
                         f"{sum(v['chrf'] for v in r.values()) / n:.2f} | "
                         f"{sum(v['acc'] for v in r.values()) / n:.3f} |")
        lines.append("")
    if "ext" in parts:
        ext = parts["ext"]
        lines += ["## Extension (Fig. 3 analogue)", "",
                  f"Base without {', '.join(ext['held'])}; the new pair is then trained alone.",
                  "", "| system | step | new pair BLEU | new pair ACC | other directions BLEU |",
                  "|---|---|---|---|---|"]
        for label, pts in ext["curves"].items():
            for p in pts:
                lines.append(f"| {label} | {p['step']} | {p['new_bleu']:.2f} | "
                             f"{p['new_acc']:.3f} | {p['others_bleu']:.2f} |")
        lines.append("")
    fam = rep["similarity_family"]
    lines += ["## Mask similarity by language family (Fig. 4 claim)", "",
              "Mean of |M1 ∩ M2| / |M1| over pairs of directions, symmetrised.", "",
              "| side | same family | different family |", "|---|---|---|"]
    for side, f in fam.items():
        cell = lambda v, n: "–" if v is None else f"{v:.4f} ({n} pairs)"  # noqa: E731
        lines.append(f"| {side} | {cell(f['same_family'], f['n_same'])} | "
                     f"{cell(f['different_family'], f['n_different'])} |")
    comp = rep["similarity_by_component"]
    if comp:
        keys = sorted({k for v in comp.values() for k in v})
        lines += ["", "Similarity by component:", "",
                  "| pair | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for pair, v in comp.items():
            lines.append(f"| {pair.replace('|', ' vs ')} | " +
                         " | ".join(f"{v.get(k, float('nan')):.4f}" for k in keys) + " |")
    lines += ["", "## Figures", ""] + [f"- {k}: `{os.path.basename(v)}`" for k, v in pngs.items()]
    lines += ["", "## Stage wall times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in rep["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def apply_preset(args) -> None:
    """Options not given on the command line take ``args.preset``'s value, else their default."""
    preset = PRESETS.get(getattr(args, "preset", None) or "", {})
    for key, default in _DEFAULTS.items():
        if getattr(args, key, _UNSET) is _UNSET:
            setattr(args, key, preset.get(key, default))
    if "steps" in preset:  # --steps KEY=N given explicitly override the preset's, key by key
        args.steps = list(preset["steps"]) + list(getattr(args, "steps", None) or [])


def run_reproduction(args) -> int:
    import torch

    from . import pipeline as P
    from .device import resolve_device

    apply_preset(args)
    if args.preset == "gpu" and resolve_device(args.device).type != "cuda":
        print("reproduce: --preset gpu is sized for one GPU (~40 min on an H100); running on "
              "the CPU", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    st = _steps(args.scale, args.steps)
    run = P.prepare(args.run, args.corpus, args.config, args.vocab_size, seed=args.seed,
                    pairs=args.pairs, max_train=args.max_train, langtok=args.langtok,
                    mask_output_proj=args.mask_output_proj, device=args.device)
    kw = {"progress": not args.quiet, "amp": args.amp, "batch_size": args.batch_size,
          "validate_every": args.validate_every, "patience": args.patience,
          "valid_limit": args.valid_limit, "lr": args.lr}
    if args.warmup is not None:
        kw["warmup"] = args.warmup
    if args.max_tokens:
        kw.update(max_tokens=args.max_tokens, batch_size=args.max_tokens)
    S = _Stages(run, kw)
    ev = {"limit": args.limit, "beam": args.beam, "progress": not args.quiet}
    todo = PARTS if args.part == "all" else tuple(args.part.split("+"))
    fns = {"main": _part_main, "sweep": _part_sweep, "ext": _part_ext}
    for part in todo:
        if part in fns:
            fns[part](run, args, st, S, ev)
    if "report" in todo:
        parts = {p: d for p in fns if (d := _load_part(run, p)) is not None}
        if "main" not in parts:
            raise FileNotFoundError("report needs the main part; run `--part main` first")
        print(f"wrote {_part_report(run, args, st, parts)}")
    return 0


def add_commands(sub) -> None:
    import argparse

    p = sub.add_parser("reproduce", help="the paper's experiments on a corpus (tables + figures)",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="demo")
    p.add_argument("--run", default="runs/reproduce")
    p.add_argument("--out", default="results")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="gpu: Transformer-base on the whole corpus, token batches, the released "
                   "schedule, sized for ~40 min on one H100 (main + report parts; writes "
                   "OUT/reproduction-gpu.md); explicit flags override it")
    p.add_argument("--part", default="all",
                   choices=("all", "main+report") + PARTS)
    p.add_argument("--report-name", default="reproduction",
                   help="OUT/NAME.md and .json (default reproduction)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--config", default="tiny")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    p.add_argument("--steps", action="append", metavar="KEY=N",
                   help=f"override a step count; keys: {', '.join(DEFAULT_STEPS)}")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--alpha-langs", nargs="+", default=["de", "zh"])
    p.add_argument("--zero-shot", nargs="+", default=["de", "fr", "es", "ru", "zh", "ar"])
    p.add_argument("--held-out", default="ar")
    p.add_argument("--pairs", nargs="+", help="English-centric pairs to use (default: all)")
    p.add_argument("--max-train", type=int, help="first N training pairs per language pair")
    p.add_argument("--langtok", default="src", choices=["src", "tgt"],
                   help="encoder language token (released LaSS: src)")
    p.add_argument("--mask-output-proj", action=argparse.BooleanOptionalAction, default=True,
                   help="mask the tied output projection (released LaSS code: on)")
    p.add_argument("--max-tokens", type=int, help="token batches of at most N tokens")
    p.add_argument("--validate-every", type=int, default=0, metavar="K")
    p.add_argument("--patience", type=int, default=0, metavar="N")
    p.add_argument("--valid-limit", type=int, default=200)
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="paired bootstrap samples against the dense baseline")
    p.add_argument("--limit", type=int, default=None, help="test sentences per direction")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--amp", default="bf16", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_reproduction)
    keys = {k for v in PRESETS.values() for k in v} - {"steps"}  # append: merged instead
    for a in p._actions:  # parse preset-able options as "unset" to tell them from explicit ones
        if a.dest in keys:
            _DEFAULTS[a.dest] = a.default
            a.default = _UNSET
