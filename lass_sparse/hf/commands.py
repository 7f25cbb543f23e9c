"""``lass-sparse hf ...``: the LaSS stages on a local Hugging Face seq2seq checkpoint.

::

    lass-sparse hf finetune --hf-model BASE --corpus DIR --pairs en-de de-en --out ft --steps 200
    lass-sparse hf prune    --hf-model BASE --finetuned ft --pairs en-de de-en --out lass
    lass-sparse hf joint    --hf-model lass --corpus DIR --out joint --steps 500
    lass-sparse hf evaluate --hf-model joint --corpus DIR --pairs en-de de-en --baseline BASE
    echo "Open the file" | lass-sparse hf translate --hf-model joint --pair en-de
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _train_kw(args: argparse.Namespace) -> dict:
    return {"batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
            "seed": args.seed, "grad_accum": args.grad_accum, "max_len": args.max_len,
            "max_train": args.max_train}


def cmd_finetune(args: argparse.Namespace) -> int:
    from . import pipeline as P

    P.set_threads(args.threads)
    for d in args.pairs:
        res = P.finetune(args.hf_model, args.corpus, d, os.path.join(args.out, d), args.steps,
                         **_train_kw(args))
        print(json.dumps(res))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from . import pipeline as P
    from .model import LaSSConfig

    cfg = LaSSConfig(alpha=args.alpha, mask_tied_output=args.mask_tied_output)
    model = P.prune(args.hf_model, {d: os.path.join(args.finetuned, d) for d in args.pairs},
                    args.out, cfg)
    st = model.lass_bank.stats()
    print(f"wrote {args.out}: {st['pairs']} pairs, {st['params']} masked tensors, "
          f"{st['bytes_per_pair']} bytes/pair")
    return 0


def cmd_joint(args: argparse.Namespace) -> int:
    from . import pipeline as P

    P.set_threads(args.threads)
    res = P.joint(args.hf_model, args.corpus, args.pairs, args.out, args.steps,
                  temperature=args.temperature, **_train_kw(args))
    print(json.dumps(res))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import pipeline as P

    P.set_threads(args.threads)
    kw = dict(split=args.split, limit=args.limit, num_beams=args.beam)
    if args.baseline is None:
        res = P.evaluate(args.hf_model, args.corpus, args.pairs, **kw)
    else:
        res = P.compare({"baseline": args.baseline, "model": args.hf_model}, args.corpus,
                        args.pairs, baseline="baseline", n_samples=args.bootstrap, **kw)
    print(json.dumps(res, indent=1))
    if args.json:
        P.write_json(args.json, res)
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from . import pipeline as P
    from .data import translate

    model, tokenizer = P.load(args.hf_model)
    lines = [x.rstrip("\n") for x in sys.stdin]
    for out in translate(model, tokenizer, lines, args.pair, num_beams=args.beam):
        print(out)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``lass-sparse hf {finetune,prune,joint,evaluate,translate}``."""
    hf = sub.add_parser("hf", help="LaSS on a local Hugging Face seq2seq checkpoint "
                        "(Marian, M2M100/NLLB, mBART-50)")
    stages = hf.add_subparsers(dest="hf_command", metavar="STAGE")

    def stage(name: str, help: str, func, train: bool = False, corpus: bool = True):
        p = stages.add_parser(name, help=help)
        p.add_argument("--hf-model", required=True, metavar="PATH",
                       help="local model folder (config, weights, tokenizer)")
        if corpus:
            p.add_argument("--corpus", default="demo",
                           help="corpus folder (train.en-xx.tsv.gz, test.tsv.gz) or 'demo'")
            p.add_argument("--threads", type=int, default=None)
        if train:
            p.add_argument("--steps", type=int, required=True)
            p.add_argument("--batch-size", type=int, default=16)
            p.add_argument("--lr", type=float, default=5e-4)
            p.add_argument("--warmup", type=int, default=0)
            p.add_argument("--grad-accum", type=int, default=1)
            p.add_argument("--max-len", type=int, default=128)
            p.add_argument("--max-train", type=int, default=None,
                           help="first N examples of each language pair")
            p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=func)
        return p

    p = stage("finetune", "fine-tune a dense copy per direction -> OUT/<direction>",
              cmd_finetune, train=True)
    p.add_argument("--pairs", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p = stage("prune", "magnitude masks of the fine-tuned models -> a LaSS model folder",
              cmd_prune, corpus=False)
    p.add_argument("--finetuned", required=True, help="folder with one subfolder per direction")
    p.add_argument("--pairs", nargs="+", required=True)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--mask-tied-output", action="store_true",
                   help="also mask the output head tied to the embedding (released LaSS code)")
    p.add_argument("--out", required=True)
    p = stage("joint", "masked joint training of a LaSS model folder", cmd_joint, train=True)
    p.add_argument("--pairs", nargs="+", default=None, help="default: every pair with a mask")
    p.add_argument("--temperature", type=float, default=5.0)
    p.add_argument("--out", required=True)
    p = stage("evaluate", "BLEU, chrF and translation accuracy per direction on the corpus' "
              "test set; with --baseline, the paired bootstrap against it", cmd_evaluate)
    p.add_argument("--pairs", nargs="+", required=True)
    p.add_argument("--baseline", default=None, metavar="PATH",
                   help="model folder to compare against on the same rows (paired bootstrap, "
                   "per direction and pooled)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples (default 1000)")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--json", default=None, help="also write the scores here")
    p = stage("translate", "translate stdin lines (zero-shot X-Y: merged masks)", cmd_translate,
              corpus=False)
    p.add_argument("--pair", required=True)
    p.add_argument("--beam", type=int, default=4)
    hf.set_defaults(func=lambda a: hf.print_help())
