"""LaSS on a Hugging Face seq2seq model, end to end: base → per-pair fine-tune → prune → masked
joint training → evaluate (BLEU, chrF, translation accuracy and the paired bootstrap of LaSS
against the base model, as the pipeline reports them), on a local model folder and a TSV corpus
(``lass_sparse.mt.corpus`` layout; ``demo`` is the bundled subset).

    python examples/hf_lass.py --model path/to/opus-mt-en-mul --corpus demo \\
        --pairs en-de en-fr --out runs/hf --ft-steps 500 --joint-steps 2000 --alpha 0.5

No model at hand? ``--toy marian|m2m100|mbart`` first writes a tiny random model and a BPE
tokenizer trained on the corpus to ``OUT/base`` (a smoke run; BLEU will be ~0).

The same stages from the shell: ``lass-sparse hf finetune|prune|joint|evaluate|translate``.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="local Hugging Face model folder (with its tokenizer)")
    ap.add_argument("--toy", choices=["marian", "m2m100", "mbart"],
                    help="make a tiny random model of this architecture instead of --model")
    ap.add_argument("--corpus", default="demo")
    ap.add_argument("--pairs", nargs="+", default=["en-de", "de-en"],
                    help="directions (each gets its own mask)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--ft-steps", type=int, default=200)
    ap.add_argument("--joint-steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=5.0)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    ap.add_argument("--mask-tied-output", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    from lass_sparse.hf import LaSSConfig
    from lass_sparse.hf import pipeline as P
    from lass_sparse.mt import Direction, load_corpus, render_significance, render_table

    P.set_threads(args.threads)
    if (args.model is None) == (args.toy is None):
        ap.error("give exactly one of --model PATH and --toy ARCH")
    base = args.model
    if args.toy:
        from lass_sparse.hf.toy import make_toy_model

        langs = sorted({x for d in args.pairs for x in Direction.parse(d)} - {"en"})
        base = make_toy_model(os.path.join(args.out, "base"), args.toy, args.corpus,
                              [f"en-{x}" for x in langs], max_train=args.max_train or 400)
    corpus = load_corpus(args.corpus, args.pairs, max_train=args.max_train)
    train = dict(batch_size=args.batch_size, lr=args.lr)

    # 1-2. per-pair fine-tune of the base (dense), 3. prune each into a mask
    ft = {}
    for d in args.pairs:
        ft[d] = os.path.join(args.out, "finetune", d)
        P.finetune(base, corpus, d, ft[d], args.ft_steps, **train)
    lass_dir = os.path.join(args.out, "masks")
    P.prune(base, ft, lass_dir, LaSSConfig(alpha=args.alpha,
                                           mask_tied_output=args.mask_tied_output))
    # 4. masked joint training from the base weights, single-pair batches, MaskedAdamW
    joint_dir = os.path.join(args.out, "joint")
    P.joint(lass_dir, corpus, args.pairs, joint_dir, args.joint_steps,
            temperature=args.temperature, **train)
    # 5. evaluate: the base model vs the LaSS model (each direction under its mask), same rows
    res = P.compare({"base": base, "lass": joint_dir}, corpus, args.pairs, baseline="base",
                    n_samples=args.bootstrap, limit=args.eval_limit, num_beams=args.beam)
    P.write_json(os.path.join(args.out, "results.json"), res)
    print(render_table(res["scores"], args.pairs, baseline="base"))
    print()
    print(render_significance(res["significance"], "base"))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
