"""``lass-sparse`` subcommands for the LaSS pipeline (each stage resumable from its checkpoint)."""

from __future__ import annotations

import json
import os
import sys


def _run(args):
    from . import pipeline as P

    if getattr(args, "corpus", None) is not None or not os.path.exists(
        os.path.join(args.run, P.RUN_JSON)
    ):
        return P.prepare(args.run, args.corpus or "demo", args.config, args.vocab_size,
                         pairs=args.pairs, max_train=args.max_train, seed=args.seed)
    return P.open_run(args.run)


def _train_kw(args) -> dict:
    kw = {"batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
          "ckpt_every": args.ckpt_every, "progress": not args.quiet, "amp": args.amp}
    if args.warmup is not None:
        kw["warmup"] = args.warmup
    return kw


def _done(run_dir: str, stage: str, res: dict, plot: bool) -> int:
    print(json.dumps(res, indent=1))
    if plot:
        from .train import plot_log

        png = plot_log(os.path.join(run_dir, stage, "log.jsonl"),
                       os.path.join(run_dir, stage, "loss.png"))
        print(f"loss curve: {png}")
    return 0


def cmd_train(args) -> int:
    from . import pipeline as P

    run = _run(args)
    res = P.train(run, args.steps, out=args.out, init=args.init, directions=args.directions,
                  temperature=args.temperature, **_train_kw(args))
    return _done(args.run, args.out, res, args.plot)


def cmd_finetune(args) -> int:
    from . import pipeline as P

    run = P.open_run(args.run)
    directions = run.directions if args.pair == ["all"] else args.pair
    for d in directions:
        res = P.finetune(run, d, args.steps, init=args.init, **_train_kw(args))
        _done(args.run, f"ft/{d}", res, args.plot)
    return 0


def cmd_prune(args) -> int:
    from . import pipeline as P

    run = P.open_run(args.run)
    bank = P.prune(run, args.alpha, directions=args.pair, out=args.out, random=args.random,
                   seed=args.seed)
    st = bank.stats()
    print(f"wrote {run.path(args.out)}: {st['pairs']} pairs, {st['bytes_per_pair']} bytes/pair, "
          f"kept {sum(st['kept_fraction'].values()) / max(st['pairs'], 1):.1%}")
    return 0


def cmd_joint(args) -> int:
    from . import pipeline as P

    run = P.open_run(args.run)
    res = P.joint(run, args.masks, args.steps, init=args.init, out=args.out,
                  directions=args.directions, temperature=args.temperature, **_train_kw(args))
    return _done(args.run, args.out, res, args.plot)


def cmd_extend(args) -> int:
    from . import pipeline as P

    run = P.open_run(args.run)
    res = P.extend(run, args.pair, masks=args.masks, init=args.init, ft_steps=args.ft_steps,
                   steps=args.steps, alpha=args.alpha, strict=args.strict, **_train_kw(args))
    print(json.dumps(res, indent=1))
    return 0


def cmd_translate(args) -> int:
    from . import pipeline as P

    run = P.open_run(args.run)
    src = open(args.input, encoding="utf-8") if args.input else sys.stdin
    texts = [line.rstrip("\n") for line in src]
    if not texts:
        print("translate: empty input, nothing to translate", file=sys.stderr)
        return 1
    hyps = P.translate_texts(run, args.stage, args.pair, texts, masks=args.masks,
                             beam=1 if args.greedy else args.beam, lenpen=args.lenpen)
    out = "\n".join(hyps) + "\n"
    if args.output:
        from ..masks import atomic_write

        atomic_write(args.output, out.encode("utf-8"))
    else:
        sys.stdout.write(out)
    return 0


def cmd_evaluate(args) -> int:
    from . import pipeline as P

    run = P.open_run(args.run)
    systems = {args.name: (args.stage, args.masks)}
    if args.baseline:
        systems = {"baseline": (args.baseline, args.baseline_masks), **systems}
    dirs = args.directions or run.directions
    res = P.evaluate(run, systems, dirs, split=args.split, limit=args.limit, beam=args.beam,
                     progress=not args.quiet)
    table = P.render_table(res, dirs, baseline="baseline" if args.baseline else None)
    print(table)
    if args.out:
        from ..masks import atomic_write

        atomic_write(args.out + ".md", (table + "\n").encode())
        atomic_write(args.out + ".json", json.dumps(res, indent=1).encode())
    return 0


def cmd_masks(args) -> int:
    from ..masks import MaskBank

    bank = MaskBank.load(args.masks)
    if args.masks_cmd == "stats":
        print(json.dumps(bank.stats(), indent=1))
        return 0
    from .plots import similarity_heatmap

    pairs = args.pairs or bank.pairs
    if args.png:
        print(f"heatmap: {similarity_heatmap(bank, pairs, args.png)}")
    for i, a in enumerate(pairs):
        for b in pairs[i + 1:]:
            s = bank.similarity(a, b, by=args.by)
            print(f"{a} vs {b}: " + (f"{s:.3f}" if isinstance(s, float) else json.dumps(
                {k: round(v, 3) for k, v in s.items()})))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def _common(p, corpus: bool = False) -> None:
    p.add_argument("--run", required=True, help="run folder (checkpoints, masks, logs)")
    if corpus:
        p.add_argument("--corpus", default=None,
                       help="corpus folder or 'demo' (the bundled subset); first call only")
        p.add_argument("--config", default="tiny", help="model size: tiny, small, base, big")
        p.add_argument("--vocab-size", type=int, default=4000)
        p.add_argument("--pairs", nargs="+", help="English-centric pairs to use (default: all)")
        p.add_argument("--max-train", type=int, help="first N training pairs per language pair")


def _training(p, steps: int) -> None:
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--amp", default="none", choices=["none", "bf16"],
                   help="bf16 autocast (fp32 master weights; ~1.6x faster on AVX512-BF16 CPUs)")
    p.add_argument("--plot", action="store_true", help="draw the loss curve (loss.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="multilingual base training (temperature sampling)")
    _common(p, corpus=True)
    _training(p, 1000)
    p.add_argument("--out", default="base", help="stage name (folder in the run)")
    p.add_argument("--init", help="start from this stage's weights (e.g. a dense baseline "
                   "continued for as many steps as LaSS's joint phase)")
    p.add_argument("--directions", nargs="+")
    p.add_argument("--temperature", type=float, default=5.0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune the base on one direction (or 'all')")
    _common(p)
    _training(p, 100)
    p.add_argument("--pair", nargs="+", required=True, help="direction(s), e.g. en-de, or all")
    p.add_argument("--init", default="base")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("prune", help="magnitude-prune fine-tuned models into a MaskBank")
    _common(p)
    p.add_argument("--alpha", type=float, default=0.5, help="fraction pruned per tensor")
    p.add_argument("--pair", nargs="+", help="directions (default: all)")
    p.add_argument("--out", default="masks.safetensors")
    p.add_argument("--random", action="store_true", help="random masks at the same sparsity")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("joint", help="structure-aware joint training with the pair masks")
    _common(p)
    _training(p, 500)
    p.add_argument("--masks", default="masks.safetensors")
    p.add_argument("--init", default="base")
    p.add_argument("--out", default="joint")
    p.add_argument("--directions", nargs="+")
    p.add_argument("--temperature", type=float, default=5.0)
    p.set_defaults(func=cmd_joint)

    p = sub.add_parser("extend", help="add directions: fine-tune, prune, train their sub-networks")
    _common(p)
    _training(p, 200)
    p.add_argument("--pair", required=True, nargs="+",
                   help="the new direction(s), e.g. en-ar ar-en (trained together)")
    p.add_argument("--masks", default="masks.safetensors")
    p.add_argument("--init", default="joint")
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--alpha", type=float)
    p.add_argument("--strict", action="store_true",
                   help="update only weights outside every other pair's mask")
    p.set_defaults(func=cmd_extend)

    p = sub.add_parser("translate", help="translate stdin (or --input) with beam search")
    _common(p)
    p.add_argument("--stage", default="joint")
    p.add_argument("--pair", required=True, help="direction; zero-shot X-Y merges masks")
    p.add_argument("--masks", help="MaskBank (omit for a dense model)")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--input")
    p.add_argument("--output")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("evaluate", help="BLEU, chrF, translation accuracy; win ratio")
    _common(p)
    p.add_argument("--stage", default="joint")
    p.add_argument("--masks")
    p.add_argument("--name", default="system")
    p.add_argument("--baseline", help="baseline stage to compare against")
    p.add_argument("--baseline-masks")
    p.add_argument("--directions", nargs="+")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--limit", type=int)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--out", help="write OUT.md and OUT.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("masks", help="mask bank tools: similarity, stats")
    msub = p.add_subparsers(dest="masks_cmd", required=True)
    q = msub.add_parser("similarity", help="LaSS Eq. 2 between pairs; heatmap PNG")
    q.add_argument("masks")
    q.add_argument("--pairs", nargs="+")
    q.add_argument("--by", default="total", choices=["total", "layer", "component", "param"])
    q.add_argument("--png")
    q.set_defaults(func=cmd_masks)
    q = msub.add_parser("stats", help="sizes and kept fractions")
    q.add_argument("masks")
    q.set_defaults(func=cmd_masks)

    p = sub.add_parser("demo", help="the whole LaSS pipeline on the bundled subset (tiny model)")
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    p.add_argument("--limit", type=int, default=100, help="test sentences per direction")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
