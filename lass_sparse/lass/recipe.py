"""``lass-sparse recipe``: the released LaSS recipe end to end, with controls and significance.

One *variant* (``recipe variant --run R --langtok src|tgt``) runs, each stage to convergence on
validation loss (early stopping, best checkpoints), every later stage from the best θ0:

    θ0 → fine-tune every direction (+ a second seed of some, for mask diagnostics)
       → prune at each α → joint per α, α chosen on validation loss
       → LaSS without the output-projection mask, dense continued training (same step cap and
         stopping rule), and (``--controls``) θ0's own mask for every direction (shared) and
         random masks at the chosen α
       → BLEU / chrF / ACC of every system on the same test rows (supervised and zero-shot), paired
         bootstrap against the dense baseline, mask diagnostics.

Variants are independent processes (e.g. ``--langtok src`` and ``--langtok tgt`` on two cores);
``recipe report --runs R1 R2 --out results`` writes ``reproduction.md`` / ``.json`` and the
validation-curve figure from their ``parts/variant.json``. Every stage resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import time

from ..fileio import atomic_write
from ..masks import MaskBank

OUT_PROJ = "decoder.output_projection.weight"
DEFAULT_STEPS = {"base": 2000, "finetune": 240, "joint": 600}
DEFAULT_VALID = {"base": 100, "finetune": 40, "joint": 100}


def _drop(bank: MaskBank, names: set[str]) -> MaskBank:
    """The bank without the masks of ``names`` (those modules then run dense)."""
    out = MaskBank({n: s for n, s in bank.shapes.items() if n not in names}, alpha=bank.alpha,
                   rule=bank.rule)
    for p in bank.pairs:
        out.add_pair(p, {n: b.clone() for n, b in bank[p].items() if n not in names})
    return out


def _curve(run, stage: str) -> list[dict]:
    path = run.path(stage, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{"step": r["step"], "valid_loss": r["valid_loss"]}
                for r in map(json.loads, f) if "valid_loss" in r]


class _Timer:
    def __init__(self, run):
        self.run, self.t = run, {}

    def __call__(self, label: str, fn, *a, **k):
        t0 = time.time()
        out = fn(*a, **k)
        self.t[label] = self.t.get(label, 0.0) + round(time.time() - t0, 1)
        print(f"[recipe {self.run.dir}] {label}: {time.time() - t0:.0f} s", flush=True)
        return out


def run_variant(args) -> dict:
    import torch

    from . import pipeline as P

    if args.threads:
        torch.set_num_threads(args.threads)
    part = os.path.join(args.run, "parts", "variant.json")
    if os.path.exists(part):
        with open(part) as f:
            return json.load(f)
    run = P.prepare(args.run, args.corpus, args.config, args.vocab_size, pairs=args.pairs,
                    max_train=args.max_train, seed=args.seed, langtok=args.langtok,
                    mask_output_proj=True, device=args.device)
    steps = {**DEFAULT_STEPS, **dict(_kv(s) for s in args.steps or [])}
    every = {**DEFAULT_VALID, **dict(_kv(s) for s in args.validate_every or [])}
    T = _Timer(run)
    common = {"progress": not args.quiet, "amp": args.amp, "max_tokens": args.max_tokens,
              "batch_size": args.max_tokens, "valid_limit": args.valid_limit,
              "seed": args.seed}

    def kw(stage: str, **extra) -> dict:
        return {**common, "validate_every": every[stage], "patience": args.patience, **extra}

    dirs = run.directions
    summary: dict = {}
    summary["base"] = T("base", P.train, run, steps["base"], out="base",
                        **kw("base", lr=args.lr, warmup=args.warmup))
    ft = {"lr": args.ft_lr, "warmup": args.ft_warmup, "dropout": args.ft_dropout}
    for d in dirs:
        summary[f"ft/{d}"] = T(f"finetune {d}", P.finetune, run, d, steps["finetune"],
                               init="base", **kw("finetune", **ft))
    for d in args.seed_check or []:
        summary[f"ft-seed1/{d}"] = T(f"finetune {d} seed 1", P.finetune, run, d,
                                     steps["finetune"], init="base", out=f"ft-seed1/{d}",
                                     **kw("finetune", **{**ft, "seed": args.seed + 1}))
    joint_kw = kw("joint", lr=args.lr, warmup=args.warmup)
    alpha_loss = {}
    for a in args.alphas:
        masks = f"masks-a{a}.safetensors"
        T(f"prune α={a}", P.prune, run, a, out=masks)
        res = T(f"joint α={a}", P.joint, run, masks, steps["joint"], init="base",
                out=f"joint-a{a}", **joint_kw)
        summary[f"joint-a{a}"] = res
        alpha_loss[a] = res["best_valid_loss"]
    best_a = min(alpha_loss, key=lambda a: alpha_loss[a])
    lass_masks = f"masks-a{best_a}.safetensors"
    bank = P.load_bank(run, lass_masks)
    _drop(bank, {OUT_PROJ}).save(run.path("masks-noout.safetensors"))
    summary["joint-noout"] = T("joint no output mask", P.joint, run, "masks-noout.safetensors",
                               steps["joint"], init="base", out="joint-noout", **joint_kw)
    summary["dense"] = T("dense", P.train, run, steps["joint"], out="dense", init="base",
                         **joint_kw)
    systems = {"dense": ("dense", None), "theta0": ("base", None),
               "LaSS": (f"joint-a{best_a}", lass_masks),
               "LaSS-noout": ("joint-noout", "masks-noout.safetensors")}
    if args.controls:
        T("prune shared", P.prune, run, best_a, out="masks-shared.safetensors",
          shared_from="base")
        T("prune random", P.prune, run, best_a, out="masks-random.safetensors", random=True,
          seed=args.seed)
        for name in ("shared", "random"):
            summary[f"joint-{name}"] = T(f"joint {name}", P.joint, run,
                                         f"masks-{name}.safetensors", steps["joint"],
                                         init="base", out=f"joint-{name}", **joint_kw)
            systems[name] = (f"joint-{name}", f"masks-{name}.safetensors")
    langs = sorted({x for d in dirs for x in d.split("-")} - {"en"})
    zero = [f"{a}-{b}" for a in langs for b in langs if a != b]
    eval_dirs = ([] if args.zero_shot_only else dirs) + zero
    hyps: dict = {}
    ev = {"limit": args.limit, "beam": args.beam, "progress": not args.quiet, "hyps_out": hyps}
    res = T("evaluate", P.evaluate, run, systems, eval_dirs, **ev)
    sig = {}
    if not args.zero_shot_only:
        sig["supervised"] = P.significance(hyps, "dense", dirs, n_samples=args.bootstrap)
    sig["zero_shot"] = P.significance(hyps, "dense", zero, n_samples=args.bootstrap)
    out = {"langtok": run.langtok, "directions": dirs, "zero_shot": zero,
           "supervised_evaluated": not args.zero_shot_only, "alpha_valid_loss": alpha_loss,
           "alpha": best_a, "systems": {k: list(v) for k, v in systems.items()},
           "results": res, "significance": sig, "stages": summary,
           "curves": {s: _curve(run, s) for s in summary},
           "diagnostics": _diagnostics(run, bank, args.seed_check or [], best_a),
           "model": run.info["model"], "config": run.info["config_name"],
           "train_examples": {d: len(run.encoded([d]).index[d]) for d in dirs},
           "test_rows": res["dense"][eval_dirs[0]]["n"], "beam": args.beam,
           "seed": args.seed, "steps_cap": steps, "validate_every": every,
           "patience": args.patience, "max_tokens": args.max_tokens, "lr": args.lr,
           "valid_limit": args.valid_limit,
           "ft": ft, "timings_s": T.t}
    os.makedirs(os.path.dirname(part), exist_ok=True)
    atomic_write(part, json.dumps(out, indent=1).encode())
    return out


def _diagnostics(run, bank: MaskBank, seed_dirs: list[str], alpha: float) -> dict:
    """Mask similarity of two fine-tune seeds of one direction vs across directions, and how
    much of each tensor the union of all masks covers."""
    from . import pipeline as P

    dirs = bank.pairs
    cross = [bank.similarity(a, b) for a in dirs for b in dirs if a != b]
    out = {"cross_direction_mean": sum(cross) / len(cross), "cross_direction_max": max(cross),
           "seed_pairs": {}}
    if seed_dirs:
        seed = P.prune(run, alpha, directions=seed_dirs, out="masks-seed1.safetensors",
                       ft_prefix="ft-seed1")
        for d in seed_dirs:
            merged = MaskBank(dict(bank.shapes), alpha=alpha)
            merged.add_pair("a", bank[d])
            merged.add_pair("b", seed[d])
            out["seed_pairs"][d] = merged.similarity("a", "b")
    from .. import unpack_mask

    union = bank.union(dirs)
    kept = sum(int(unpack_mask(b, bank.shapes[n][-1]).sum()) for n, b in union.items())
    total = sum(s[0] * s[1] for s in bank.shapes.values())
    out["union_coverage"] = kept / total
    return out


def _avg(res: dict, system: str, dirs: list[str], metric: str) -> float:
    return sum(res[system][d][metric] for d in dirs) / len(dirs)


def curves_plot(variants: dict[str, dict], out_png: str) -> str:
    """Validation loss of every stage of every variant (convergence), one panel per variant."""
    from .plots import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4), squeeze=False)
    for ax, v in zip(axes[0], variants.values()):
        for stage, pts in v["curves"].items():
            if pts:
                ax.plot([p["step"] for p in pts], [p["valid_loss"] for p in pts],
                        label=stage, lw=1, ls="--" if stage.startswith("ft") else "-")
        ax.set_title(f"langtok {v['langtok']}: validation loss per stage")
        ax.set_xlabel("step of the stage")
        ax.set_ylabel("label-smoothed CE (validation)")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(plt, fig, out_png)


def _variant(run_dir: str, hint: str) -> dict:
    """``RUN/parts/variant.json``; a missing file names itself and ``hint``."""
    path = os.path.join(run_dir, "parts", "variant.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: {hint}")
    with open(path) as f:
        return json.load(f)


def report(run_dirs: list[str], out_dir: str) -> str:
    """``reproduction.md`` / ``.json`` / ``curves.png`` from the variants' ``parts/variant.json``
    (the discussion is written by hand below the generated part)."""
    from .pipeline import render_significance, render_table

    variants = {}
    dirs_of: dict[str, str] = {}
    for r in run_dirs:
        v = _variant(r, f"run `lass-sparse recipe variant --run {r}` first")
        variants[v["langtok"]] = v
        dirs_of[v["langtok"]] = r
    os.makedirs(out_dir, exist_ok=True)
    png = curves_plot(variants, os.path.join(out_dir, "curves.png"))
    main = next((v for v in variants.values() if v["supervised_evaluated"]), None)
    figs = {"validation curves": png}
    if main is not None:
        from .plots import layer_similarity_plot, similarity_heatmap

        mdir = dirs_of[main["langtok"]]
        bank = MaskBank.load(os.path.join(mdir, f"masks-a{main['alpha']}.safetensors"))
        dirs = main["directions"]
        figs["mask similarity (LaSS Fig. 4)"] = similarity_heatmap(
            bank, dirs, os.path.join(out_dir, "similarity.png"))
        want = [("en-fr", "en-de"), ("en-fr", "en-zh"), ("fr-en", "de-en"), ("fr-en", "zh-en")]
        pairs = [(a, b) for a, b in want if a in dirs and b in dirs] or [(dirs[0], dirs[1])]
        figs["similarity per layer (Fig. 5/6)"] = layer_similarity_plot(
            bank, pairs, os.path.join(out_dir, "layer_similarity.png"))
    L = ["# LaSS reproduction v2: the released recipe, with controls and significance", ""]
    any_v = next(iter(variants.values()))
    m = any_v["model"]
    L += ["## Protocol", "",
          f"- Data: ../shared/corpus, pairs {', '.join(sorted({d for d in any_v['directions']}))}"
          f" ({', '.join(f'{d}: {n}' for d, n in any_v['train_examples'].items())} training "
          "examples); validation: the first "
          f"{any_v.get('valid_limit', 200)} rows of valid.tsv.gz per direction; test: "
          f"{any_v['test_rows']} rows of test.tsv.gz (the same rows for every system), beam "
          f"{any_v['beam']}.",
          f"- Model `{any_v['config']}`: d={m['d_model']}, {m['enc_layers']}+{m['dec_layers']} "
          f"layers, FFN {m['ffn']}, vocabulary {m['vocab_size']}, dropout {m['dropout']}; "
          f"token batches of {any_v['max_tokens']} tokens; bf16 autocast; lr {any_v['lr']} "
          f"(fine-tune: {any_v['ft']}).",
          f"- Every stage to convergence: validation every {any_v['validate_every']} steps, "
          f"patience {any_v['patience']} validations, step caps {any_v['steps_cap']}; later "
          "stages start from the best θ0 with optimizer and schedule reset.",
          f"- One seed ({any_v['seed']}) per variant; α chosen on validation loss among "
          f"{list(any_v['alpha_valid_loss'])}. Paired bootstrap: sacrebleu's, 1000 samples, "
          "against the dense baseline.",
          "- Variants (separate θ0s): " + "; ".join(
              f"`{k}`: {', '.join(v['systems'])}, α={v['alpha']}, "
              f"{sum(v['timings_s'].values()) / 3600:.2f} h of stages"
              for k, v in variants.items()), ""]
    L += ["## Figures", ""] + [f"- {k}: `{os.path.basename(v)}`" for k, v in figs.items()]
    L += ["", "## Convergence", "", f"![validation curves]({os.path.basename(png)})", "",
          "| variant | stage | steps run | best step | best valid loss | stopped early |",
          "|---|---|---|---|---|---|"]
    for k, v in variants.items():
        for stage, r in v["stages"].items():
            bl = r.get("best_valid_loss")
            L.append(f"| {k} | {stage} | {r['steps']} | {r.get('best_step')} | "
                     f"{'–' if bl is None else f'{bl:.4f}'} | {r.get('stopped_early')} |")
    L += ["", "α selection (best validation loss of the joint stage):", ""]
    for k, v in variants.items():
        L.append(f"- `{k}`: " + ", ".join(f"α={a}: {x:.4f}"
                                          for a, x in v["alpha_valid_loss"].items())
                 + f" → α={v['alpha']}")
    if main is not None:
        res, dirs = main["results"], main["directions"]
        L += ["", f"## Supervised directions (langtok `{main['langtok']}`)", "",
              "`theta0` = the base (the paper's baseline); `dense` = θ0 trained on, dense, "
              "under the same step cap and stopping rule as the joint stage (the fair "
              "baseline); `LaSS` = masked joint training; `LaSS-noout` = the same without the "
              "output-projection mask; `shared` = θ0's own magnitude mask for every direction; "
              "`random` = random masks at the same α.", "",
              render_table(res, dirs, "dense"), "",
              render_significance(main["significance"]["supervised"], "dense")]
    zs = any_v["zero_shot"]
    L += ["", "## Zero-shot: language tag × output-projection mask", "",
          f"Average over {len(zs)} zero-shot directions ({', '.join(zs)}); ACC = share of "
          "outputs in the target language (langid). LaSS uses merged X→en encoder / en→Y "
          "decoder masks.", "",
          "| system | " + " | ".join(f"{k} BLEU | {k} ACC" for k in variants) + " |",
          "|---|" + "---|---|" * len(variants)]
    for sysname in ("theta0", "dense", "LaSS", "LaSS-noout"):
        cells = []
        for v in variants.values():
            cells += [f"{_avg(v['results'], sysname, zs, 'bleu'):.2f}",
                      f"{_avg(v['results'], sysname, zs, 'acc'):.3f}"]
        L.append(f"| {sysname} | " + " | ".join(cells) + " |")
    for k, v in variants.items():
        L += ["", f"Zero-shot significance, langtok `{k}`:", "",
              render_significance(v["significance"]["zero_shot"], "dense")]
    L += ["", "## Mask diagnostics", "",
          "| variant | α | cross-direction similarity (mean / max) | same direction, two "
          "fine-tune seeds | union of all masks covers |", "|---|---|---|---|---|"]
    for k, v in variants.items():
        dg = v["diagnostics"]
        seeds = ", ".join(f"{d}: {x:.4f}" for d, x in dg["seed_pairs"].items()) or "–"
        L.append(f"| {k} | {v['alpha']} | {dg['cross_direction_mean']:.4f} / "
                 f"{dg['cross_direction_max']:.4f} | {seeds} | {dg['union_coverage']:.1%} |")
    md = "\n".join(L) + "\n"
    atomic_write(os.path.join(out_dir, "reproduction.md"), md.encode())
    atomic_write(os.path.join(out_dir, "reproduction.json"),
                 json.dumps(variants, indent=1).encode())
    return os.path.join(out_dir, "reproduction.md")


def publish(run_dir: str, out_dir: str, alpha: float | None = None) -> dict:
    """Copy the main comparison's models (θ0, dense, LaSS: best checkpoints, bf16 safetensors),
    the compact mask bank, the SentencePiece model and run.json into a small run folder that
    ``lass-sparse evaluate --run OUT --test FILE`` can score; returns ``{file: sha256}``."""
    import hashlib
    import shutil

    import torch
    from safetensors.torch import load_file, save

    from .checkpoint import read_state

    if alpha is None:
        alpha = _variant(run_dir, "pass --alpha (the LaSS masks are "
                                  "masks-a<alpha>.safetensors)")["alpha"]
    v = {"alpha": alpha}
    os.makedirs(out_dir, exist_ok=True)
    info = json.load(open(os.path.join(run_dir, "run.json")))
    info["corpus"] = "demo"  # the training corpus is not needed to score --test files
    atomic_write(os.path.join(out_dir, "run.json"), json.dumps(info, indent=1).encode())
    shutil.copyfile(os.path.join(run_dir, "spm.model"), os.path.join(out_dir, "spm.model"))
    stages = {"theta0": "base", "dense": "dense", "lass": f"joint-a{v['alpha']}"}
    for name, stage in stages.items():
        src = os.path.join(run_dir, stage, "best")
        if not os.path.exists(os.path.join(src, "state.json")):
            src = os.path.join(run_dir, stage, "ckpt")
        st = read_state(src)
        sd = load_file(os.path.join(src, st["model_file"]))
        ck = os.path.join(out_dir, name, "ckpt")
        os.makedirs(ck, exist_ok=True)
        atomic_write(os.path.join(ck, "model.safetensors"),
                     save({k: t.to(torch.bfloat16).contiguous() for k, t in sd.items()}))
        atomic_write(os.path.join(ck, "state.json"), json.dumps(
            {"step": st["step"], "model_file": "model.safetensors", "optim_file": None,
             "from": f"{stage}/{os.path.basename(src)}", "dtype": "bfloat16"}).encode())
    MaskBank.load(os.path.join(run_dir, f"masks-a{v['alpha']}.safetensors")).save(
        os.path.join(out_dir, "masks.safetensors"), compact=True)
    sums = {}
    for root, _, files in os.walk(out_dir):
        for f in sorted(files):
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                sums[os.path.relpath(path, out_dir)] = hashlib.sha256(fh.read()).hexdigest()
    return sums


def _kv(item: str) -> tuple[str, int]:
    key, sep, val = item.partition("=")
    if not sep or key not in DEFAULT_STEPS or not val.isdigit():
        raise ValueError(f"expected KEY=N with KEY in {sorted(DEFAULT_STEPS)}, got {item!r}")
    return key, int(val)


def add_commands(sub) -> None:
    import argparse

    p = sub.add_parser("recipe", help="the released LaSS recipe with controls (variant/report)",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = p.add_subparsers(dest="recipe_cmd", required=True)
    v = rsub.add_parser("variant", help="one variant (a run folder): all stages + evaluation")
    v.add_argument("--run", required=True)
    v.add_argument("--corpus", default="demo")
    v.add_argument("--pairs", nargs="+", default=["en-de", "en-fr", "en-zh"])
    v.add_argument("--max-train", type=int, default=10000)
    v.add_argument("--config", default="tiny")
    v.add_argument("--vocab-size", type=int, default=8000)
    v.add_argument("--langtok", default="src", choices=["src", "tgt"])
    v.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7])
    v.add_argument("--controls", action="store_true", help="shared-mask and random controls")
    v.add_argument("--zero-shot-only", action="store_true",
                   help="evaluate only the zero-shot directions")
    v.add_argument("--seed-check", nargs="*", help="directions fine-tuned with a second seed")
    v.add_argument("--steps", action="append", metavar="STAGE=N",
                   help=f"step caps (defaults {DEFAULT_STEPS})")
    v.add_argument("--validate-every", action="append", metavar="STAGE=K",
                   help=f"validation interval (defaults {DEFAULT_VALID})")
    v.add_argument("--patience", type=int, default=4)
    v.add_argument("--valid-limit", type=int, default=200)
    v.add_argument("--max-tokens", type=int, default=4096)
    v.add_argument("--lr", type=float, default=2e-3)
    v.add_argument("--warmup", type=int, default=200)
    v.add_argument("--ft-lr", type=float, default=1e-3)
    v.add_argument("--ft-warmup", type=int, default=20)
    v.add_argument("--ft-dropout", type=float, default=0.3)
    v.add_argument("--amp", default="bf16", choices=["auto", "none", "bf16", "fp16"])
    v.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda:N")
    v.add_argument("--limit", type=int, default=None, help="test rows (default: all)")
    v.add_argument("--beam", type=int, default=4)
    v.add_argument("--bootstrap", type=int, default=1000)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--threads", type=int, default=0)
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=lambda a: (run_variant(a), 0)[1])
    r = rsub.add_parser("report", help="reproduction.md from finished variants")
    r.add_argument("--runs", nargs="+", required=True)
    r.add_argument("--out", default="results")
    r.set_defaults(func=lambda a: print(f"wrote {report(a.runs, a.out)}") or 0)
    q = rsub.add_parser("publish", help="θ0 / dense / LaSS (bf16), masks, tokenizer → a folder")
    q.add_argument("--run", required=True)
    q.add_argument("--out", default="results/models")
    q.add_argument("--alpha", type=float, help="the LaSS α (default: the variant's choice)")
    q.set_defaults(func=lambda a: print(json.dumps(publish(a.run, a.out, a.alpha), indent=1))
                   or 0)
