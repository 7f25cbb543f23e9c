"""``lass-sparse`` subcommands for the LaSS pipeline (each stage resumable from its checkpoint).

Arguments are validated before any work (argparse types, then the files they name); user errors
raise :class:`~lass_sparse.cli.CommandError` or a ValueError / OSError naming the file or
argument, which ``lass-sparse`` prints as one line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from ..cli import (
    CommandError,
    add_nproc_option,
    finite_float,
    fraction,
    missing_package,
    nonneg_int,
    positive_float,
    positive_int,
)


def system_spec(spec: str) -> tuple[str, tuple[str, str | None]]:
    """``NAME=STAGE`` or ``NAME=STAGE@MASKS`` (``--system``)."""
    name, sep, rest = spec.partition("=")
    stage, _, masks = rest.partition("@")
    if not sep or not name or not stage:
        raise argparse.ArgumentTypeError(f"expected NAME=STAGE or NAME=STAGE@MASKS, got {spec!r}")
    return name, (stage, masks or None)


# ------------------------------------------------------------------- checks before work

_NEEDS = {  # command -> optional packages it imports (the [lass] extra)
    "train": ("sentencepiece",), "finetune": ("sentencepiece",), "prune": ("sentencepiece",),
    "joint": ("sentencepiece",), "extend": ("sentencepiece",),
    "translate": ("sentencepiece",), "evaluate": ("sentencepiece", "sacrebleu", "langid"),
    "demo": ("sentencepiece", "sacrebleu", "langid", "matplotlib"),
}


def require_packages(args) -> None:
    """Refuse, before any work, a command whose optional packages are missing (one line naming
    the extra to install)."""
    command = args.command + (f" {args.masks_cmd}" if getattr(args, "masks_cmd", None) else "")
    needs = list(_NEEDS.get(args.command, ()))
    if getattr(args, "plot", False) or getattr(args, "png", None):
        needs.append("matplotlib")
    for name in needs:
        try:
            importlib.import_module(name)
        except ImportError:
            raise missing_package(name, f"`lass-sparse {command}`") from None


def _device(args):
    """``--device`` of this process (under a launch, a bare ``cuda`` is this rank's GPU)."""
    from .runtime import device_for

    return device_for(getattr(args, "device", None) or "auto")


def _dist_setup(args) -> tuple[int, int]:
    """Join the launch's process group (the CLI has refused one-process commands there)."""
    from .runtime import init_process_group

    return init_process_group(getattr(args, "device", None) or "auto")


def _open_run(run_dir: str, args=None):
    """The run, checked first (:func:`~lass_sparse.lass.runtime.open_checked`)."""
    from .runtime import open_checked

    return open_checked(run_dir, getattr(args, "device", None) or "auto")


def _run(args):
    """Create the run (first call, or ``--corpus`` given) or reopen it; options fixed at
    creation are checked against the run."""
    from .runtime import create_or_open

    run = create_or_open(
        args.run, corpus=args.corpus, device=args.device or "auto", config=args.config,
        vocab_size=args.vocab_size, pairs=args.pairs, max_train=args.max_train, seed=args.seed,
        langtok=args.langtok or "src",
        mask_output_proj=True if args.mask_output_proj is None else args.mask_output_proj)
    _check_fixed_options(args, run)
    return run


def _check_fixed_options(args, run) -> None:
    """Options fixed at creation: a different value on a later call is an error, not ignored."""
    for opt, want, have in (("--langtok", args.langtok, run.langtok),
                            ("--mask-output-proj", args.mask_output_proj,
                             run.model_config.mask_output_proj)):
        if want is not None and want != have:
            raise CommandError(f"run {args.run} was created with {opt} {have}; it cannot "
                               "change (start a new --run)")


def _train_kw(args) -> dict:
    kw = {"lr": args.lr, "seed": args.seed, "ckpt_every": args.ckpt_every, "accum": args.accum,
          "fsdp": args.fsdp, "compile": args.compile,
          "progress": not args.quiet, "amp": args.amp, "validate_every": args.validate_every,
          "patience": args.patience, "valid_limit": args.valid_limit,
          "max_tokens": args.max_tokens}
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    elif args.max_tokens is not None:
        kw["batch_size"] = args.max_tokens  # rows are then capped by the token budget only
    if args.warmup is not None:
        kw["warmup"] = args.warmup
    if getattr(args, "dropout", None) is not None:
        kw["dropout"] = args.dropout
    return kw


def _done(run_dir: str, stage: str, res: dict, plot: bool) -> int:
    print(json.dumps(res, indent=1))
    if res.get("stopped_early"):
        print(f"{stage}: stopped early at step {res['steps']}; best validation loss "
              f"{res['best_valid_loss']:.4f} at step {res['best_step']} ({stage}/best)")
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

    run = _open_run(args.run, args)
    directions = run.directions if args.pair == ["all"] else args.pair
    world, rank = _dist_setup(args)
    spread = world > 1 and len(directions) > 1  # torchrun: one direction per rank at a time
    for d in directions[rank::world] if spread else directions:
        out = f"{args.out_prefix}/{d}"
        res = P.finetune(run, d, args.steps, init=args.init, out=out, distributed=not spread,
                         **_train_kw(args))
        _done(args.run, out, res, args.plot)
    if spread:
        import torch.distributed as dist

        dist.barrier()
    return 0


def cmd_prune(args) -> int:
    from . import pipeline as P

    run = _open_run(args.run, args)
    bank = P.prune(run, args.alpha, directions=args.pair, out=args.out, random=args.random,
                   seed=args.seed, ft_prefix=args.ft_prefix, shared_from=args.shared_from)
    st = bank.stats()
    print(f"wrote {run.path(args.out)}: {st['pairs']} pairs, {st['bytes_per_pair']} bytes/pair, "
          f"kept {sum(st['kept_fraction'].values()) / max(st['pairs'], 1):.1%}")
    return 0


def cmd_joint(args) -> int:
    from . import pipeline as P

    run = _open_run(args.run, args)
    res = P.joint(run, args.masks, args.steps, init=args.init, out=args.out,
                  directions=args.directions, temperature=args.temperature, **_train_kw(args))
    return _done(args.run, args.out, res, args.plot)


def cmd_extend(args) -> int:
    from . import pipeline as P

    run = _open_run(args.run, args)
    res = P.extend(run, args.pair, masks=args.masks, init=args.init, ft_steps=args.ft_steps,
                   steps=args.steps, alpha=args.alpha, strict=args.strict, ft_init=args.ft_init,
                   out=args.out, **_train_kw(args))
    print(json.dumps(res, indent=1))
    return 0


def _read_text(path: str | None) -> list[str]:
    """Lines of ``--input`` (or stdin) as UTF-8; a binary or non-UTF-8 input is refused naming
    the line."""
    where = f"--input {path}" if path else "standard input"
    if path is not None:
        if not os.path.isfile(path):
            raise CommandError(f"--input {path} does not exist (or is not a file)")
        with open(path, "rb") as f:
            data = f.read()
    else:
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CommandError(f"{where} is not UTF-8 text (line {line}, byte {e.start}: "
                           f"{e.reason}); translate text files only") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise CommandError(f"{where} looks binary (a NUL byte on line {line}); translate text "
                           "files only")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as text mode did
    if lines[-1] == "":
        lines.pop()
    return lines


def cmd_translate(args) -> int:
    from . import pipeline as P

    texts = _read_text(args.input)
    if not texts:
        print("translate: empty input, nothing to translate", file=sys.stderr)
        return 1
    run = _open_run(args.run, args)
    hyps = P.translate_texts(run, args.stage, args.pair, texts, masks=args.masks,
                             beam=1 if args.greedy else args.beam, lenpen=args.lenpen,
                             materialize=args.materialize)
    out = "\n".join(hyps) + "\n"
    if args.output:
        from ..fileio import atomic_write

        atomic_write(args.output, out.encode("utf-8"))
    else:
        sys.stdout.write(out)
    return 0


def cmd_evaluate(args) -> int:
    from ..mt.metrics import significance
    from ..mt.report import render_significance, render_table
    from . import pipeline as P

    if args.bootstrap and not args.baseline:
        raise CommandError("--bootstrap needs --baseline (the system to test against)")
    systems = dict(args.system or [])
    if not systems or args.masks or args.stage != "joint":
        systems[args.name] = (args.stage, args.masks)
    if args.baseline:
        systems = {"baseline": (args.baseline, args.baseline_masks), **systems}
    rows = None
    if args.test:
        from ..mt.corpus import read_test_file

        rows = read_test_file(args.test)  # FileNotFoundError / ValueError naming file:line
    run = _open_run(args.run, args)
    dirs = args.directions or run.directions
    hyps: dict = {}
    res = P.evaluate(run, systems, dirs, split=args.split, limit=args.limit, beam=args.beam,
                     progress=not args.quiet, rows=rows, hyps_out=hyps,
                     materialize=args.materialize)
    base = "baseline" if args.baseline else None
    table = render_table(res, dirs, baseline=base)
    out = {"results": res, "test": args.test or args.split, "limit": args.limit}
    if args.bootstrap:
        if base is None:
            raise ValueError("--bootstrap needs --baseline (the system to test against)")
        sig = significance(hyps, base, dirs, n_samples=args.bootstrap)
        table += "\n\n" + render_significance(sig, base)
        out["significance"] = sig
    print(table)
    if args.out:
        from ..fileio import atomic_write

        atomic_write(args.out + ".md", (table + "\n").encode())
        atomic_write(args.out + ".json", json.dumps(out, indent=1).encode())
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


def _guarded(fn):
    """``fn(args)`` after the optional-package check (before any work)."""

    def run(args):
        require_packages(args)
        return fn(args)

    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _common(p, corpus: bool = False) -> None:
    from .device import DEVICE_HELP

    p.add_argument("--run", required=True, help="run folder (checkpoints, masks, logs)")
    p.add_argument("--device", default="auto", help=f"where to train/translate: {DEVICE_HELP}")
    if corpus:
        p.add_argument("--corpus", default=None,
                       help="corpus folder or 'demo' (the bundled subset); first call only")
        p.add_argument("--config", default="tiny", help="model size: tiny, small, base, big")
        p.add_argument("--vocab-size", type=positive_int, default=4000)
        p.add_argument("--pairs", nargs="+", help="English-centric pairs to use (default: all)")
        p.add_argument("--max-train", type=positive_int,
                       help="first N training pairs per language pair")
        p.add_argument("--langtok", choices=["src", "tgt"], default=None,
                       help="encoder language token: src (released LaSS configs, default) or "
                       "tgt (target language); fixed when the run is created")
        p.add_argument("--mask-output-proj", action=argparse.BooleanOptionalAction,
                       default=None, help="mask the tied output projection per pair (what the "
                       "released LaSS code ran; default on); fixed when the run is created")


def _training(p, steps: int, lr: float = 2e-3) -> None:
    p.add_argument("--steps", type=positive_int, default=steps,
                   help="number of steps (an upper bound with --patience)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="sentences per batch (default 64; with --max-tokens: a cap on rows)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="token batches: length-bucketed, at most N padded tokens (fairseq)")
    p.add_argument("--lr", type=positive_float, default=lr)
    p.add_argument("--warmup", type=nonneg_int, default=None)
    p.add_argument("--validate-every", type=nonneg_int, default=0, metavar="K",
                   help="validation loss every K steps; best weights kept in STAGE/best")
    p.add_argument("--patience", type=nonneg_int, default=0, metavar="N",
                   help="stop after N validations without improvement (0: never)")
    p.add_argument("--valid-limit", type=positive_int, default=200,
                   help="validation rows per direction (default 200)")
    p.add_argument("--accum", type=positive_int, default=1, metavar="A",
                   help="batches accumulated per step (fairseq --update-freq); under torchrun "
                   "each rank adds its batches, so N ranks ≈ one process with --accum N")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: FSDP2 (row-sharded parameters and optimizer state) "
                   "instead of DDP; checkpoints stay whole")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward: one graph serves every pair (the "
                   "first steps compile; worth it for long runs on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=positive_int, default=100)
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="autocast with fp32 master weights: auto = bf16 on a GPU (fp16 with a "
                   "grad scaler where bf16 is missing), none on a CPU; bf16 on a CPU is ~1.6x "
                   "faster on AVX512-BF16 CPUs")
    p.add_argument("--plot", action="store_true", help="draw the loss curve (loss.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_nproc_option(p)


def _materialize_flag(p) -> None:
    p.add_argument("--materialize", action="store_true",
                   help="keep W ⊙ M of each layer for the direction being decoded (one masked "
                   "copy of the model's weights): the dense kernels, memory for speed")


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="multilingual base training (temperature sampling)")
    _common(p, corpus=True)
    _training(p, 1000)
    p.add_argument("--out", default="base", help="stage name (folder in the run)")
    p.add_argument("--init", help="start from this stage's weights (e.g. a dense baseline "
                   "continued for as many steps as LaSS's joint phase)")
    p.add_argument("--directions", nargs="+")
    p.add_argument("--temperature", type=positive_float, default=5.0)
    p.set_defaults(func=_guarded(cmd_train))

    p = sub.add_parser("finetune", help="fine-tune the base on one direction (or 'all')")
    _common(p)
    _training(p, 100)
    p.add_argument("--pair", nargs="+", required=True, help="direction(s), e.g. en-de, or all")
    p.add_argument("--init", default="base", help="stage to start from (its best checkpoint)")
    p.add_argument("--dropout", type=fraction, help="dropout during the fine-tune (released: 0.3)")
    p.add_argument("--out-prefix", default="ft",
                   help="write PREFIX/<direction> (e.g. ft-seed1 for a second seed)")
    p.set_defaults(func=_guarded(cmd_finetune))

    p = sub.add_parser("prune", help="magnitude-prune fine-tuned models into a MaskBank")
    _common(p)
    p.add_argument("--alpha", type=fraction, default=0.5,
                   help="fraction pruned per tensor, in [0, 1)")
    p.add_argument("--pair", nargs="+", help="directions (default: all)")
    p.add_argument("--out", default="masks.safetensors")
    p.add_argument("--random", action="store_true", help="random masks at the same sparsity")
    p.add_argument("--shared-from", metavar="STAGE",
                   help="control: STAGE's own magnitude mask (e.g. base) for every direction")
    p.add_argument("--ft-prefix", default="ft", help="fine-tuned models under PREFIX/<dir>")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_guarded(cmd_prune))

    p = sub.add_parser("joint", help="structure-aware joint training with the pair masks")
    _common(p)
    _training(p, 500)
    p.add_argument("--masks", default="masks.safetensors")
    p.add_argument("--init", default="base")
    p.add_argument("--out", default="joint")
    p.add_argument("--directions", nargs="+")
    p.add_argument("--temperature", type=positive_float, default=5.0)
    p.set_defaults(func=_guarded(cmd_joint))

    p = sub.add_parser("extend", help="add directions: fine-tune, prune, train their sub-networks")
    _common(p)
    _training(p, 200)
    p.add_argument("--pair", required=True, nargs="+",
                   help="the new direction(s), e.g. en-ar ar-en (trained together)")
    p.add_argument("--masks", default="masks.safetensors")
    p.add_argument("--init", default="joint")
    p.add_argument("--ft-steps", type=positive_int, default=100)
    p.add_argument("--ft-init", default="base",
                   help="fine-tune the new directions from this stage (released: θ0 = base)")
    p.add_argument("--alpha", type=fraction, help="fraction pruned per tensor, in [0, 1)")
    p.add_argument("--strict", action="store_true",
                   help="update only weights outside every other pair's mask")
    p.add_argument("--out", help="stage folder in the run (default: extend/<directions>); the "
                   "extended mask bank is OUT/masks.safetensors")
    p.set_defaults(func=_guarded(cmd_extend))

    p = sub.add_parser("translate", help="translate stdin (or --input) with beam search")
    _common(p)
    p.add_argument("--stage", default="joint")
    p.add_argument("--pair", required=True, help="direction; zero-shot X-Y merges masks")
    p.add_argument("--masks", help="MaskBank (omit for a dense model)")
    p.add_argument("--beam", type=positive_int, default=4)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--lenpen", type=finite_float, default=1.0)
    p.add_argument("--input")
    p.add_argument("--output")
    _materialize_flag(p)
    p.set_defaults(func=_guarded(cmd_translate))

    p = sub.add_parser("evaluate", help="BLEU, chrF, translation accuracy; win ratio; "
                       "paired bootstrap")
    _common(p)
    p.add_argument("--stage", default="joint")
    p.add_argument("--masks")
    p.add_argument("--name", default="system")
    p.add_argument("--system", action="append", metavar="NAME=STAGE[@MASKS]", type=system_spec,
                   help="a system to score (repeatable), e.g. theta0=base lass=joint@masks."
                   "safetensors shared=joint-shared@masks-shared.safetensors")
    p.add_argument("--test", metavar="FILE.tsv[.gz]",
                   help="your own multi-way test set (header line of language codes)")
    p.add_argument("--bootstrap", type=nonneg_int, default=0, metavar="N",
                   help="paired bootstrap with N samples against --baseline (sacrebleu's)")
    p.add_argument("--baseline", help="baseline stage to compare against")
    p.add_argument("--baseline-masks")
    p.add_argument("--directions", nargs="+")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--limit", type=positive_int, help="test sentences per direction")
    p.add_argument("--beam", type=positive_int, default=4)
    p.add_argument("--out", help="write OUT.md and OUT.json")
    p.add_argument("--quiet", action="store_true")
    _materialize_flag(p)
    p.set_defaults(func=_guarded(cmd_evaluate))

    p = sub.add_parser("masks", help="mask bank tools: similarity, stats")
    msub = p.add_subparsers(dest="masks_cmd", required=True, metavar="{similarity,stats}")
    q = msub.add_parser("similarity", help="LaSS Eq. 2 between pairs; heatmap PNG")
    q.add_argument("masks")
    q.add_argument("--pairs", nargs="+")
    q.add_argument("--by", default="total", choices=["total", "layer", "component", "param"])
    q.add_argument("--png")
    q.set_defaults(func=_guarded(cmd_masks))
    q = msub.add_parser("stats", help="sizes and kept fractions")
    q.add_argument("masks")
    q.set_defaults(func=_guarded(cmd_masks))
