"""The LaSS stages as Python functions over a run folder (the CLI calls these).

Run folder layout::

    run.json            corpus, model config (incl. mask_output_proj), tokenizer, langtok
    spm.model           SentencePiece model trained on the training text
    <stage>/ckpt/       last checkpoint: model + optimizer + state (resumable)
    <stage>/best/       best weights on the validation loss (stages run with validate_every)
    <stage>/log.jsonl   training loss and validation curves
    masks*.safetensors  MaskBanks written by `prune` (and `extend`)

Later stages start from, and evaluation uses, a stage's ``best`` checkpoint when it has one (the
released recipe fine-tunes and joint-trains from the best θ0), else its last.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

import torch

from ..fileio import atomic_write
from ..masks import MaskBank
from ..mt.corpus import Corpus, load_corpus
from ..mt.direction import Direction
from ..nn import active_pair, attach, masked_parameters, materialized
from .checkpoint import has_checkpoint, load_checkpoint
from .device import resolve_device
from .model import ModelConfig, Seq2Seq, make_config
from .runfile import RUN_JSON, RunError, read_run_json
from .tokenizer import Tokenizer
from .train import LANGTOKS, Encoded, TrainConfig, UpdatePolicy, run_stage


@dataclass
class Run:
    dir: str
    corpus: Corpus
    tok: Tokenizer
    model_config: ModelConfig
    info: dict
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _encoded: dict = field(default_factory=dict)

    @property
    def directions(self) -> list[str]:
        return self.corpus.directions

    @property
    def langtok(self) -> str:
        """Encoder language token: ``src`` or ``tgt`` (runs made before the option: ``tgt``)."""
        return self.info.get("langtok", "tgt")

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def new_model(self) -> Seq2Seq:
        """A freshly initialised model (the same on every device: initialised on the CPU)."""
        torch.manual_seed(self.info.get("seed", 0))
        return Seq2Seq(self.model_config).to(self.device)

    def checkpoint(self, stage: str, which: str = "best") -> str:
        """Folder of a stage's ``best`` checkpoint (falls back to ``last`` without one)."""
        if which not in ("best", "last"):
            raise ValueError(f"which must be 'best' or 'last', got {which!r}")
        best = self.path(stage, "best")
        if which == "best" and has_checkpoint(best):
            return best
        return self.path(stage, "ckpt")

    def load_model(self, stage: str, which: str = "best",
                   device: torch.device | str | None = None) -> Seq2Seq:
        """A stage's weights on ``device`` (default: the run's)."""
        ckpt = self.checkpoint(stage, which)
        if not has_checkpoint(ckpt):
            raise FileNotFoundError(f"no checkpoint for stage {stage!r} in {self.dir} "
                                    f"(expected {ckpt}/state.json); run that stage first")
        model = Seq2Seq(self.model_config)
        load_checkpoint(ckpt, model)
        return model.to(self.device if device is None else device)

    def encoded(self, directions: list[str]) -> Encoded:
        key = tuple(directions)
        if key not in self._encoded:
            self._encoded[key] = Encoded(self.corpus, self.tok, list(directions),
                                         self.model_config.max_len, self.langtok)
        return self._encoded[key]

    def valid_encoded(self, directions: list[str], limit: int | None = None) -> Encoded:
        """The first ``limit`` rows of the validation set, for each direction."""
        key = ("valid", tuple(directions), limit)
        if key not in self._encoded:
            if not self.corpus.valid:
                raise ValueError(f"corpus {self.corpus.root} has no valid.tsv.gz; validation "
                                 "(--validate-every) needs one")
            pairs = {}
            for d in directions:
                src, ref = self.corpus.eval_set("valid", d, limit)
                pairs[d] = list(zip(src, ref))
            self._encoded[key] = Encoded(None, self.tok, list(directions),
                                         self.model_config.max_len, self.langtok, pairs=pairs)
        return self._encoded[key]


def prepare(run_dir: str, corpus: str = "demo", config: str = "tiny", vocab_size: int = 4000,
            pairs: list[str] | None = None, max_train: int | None = None, seed: int = 0,
            langtok: str = "src", mask_output_proj: bool = True, device: str = "auto",
            **model_overrides) -> Run:
    """Create (or reopen) a run: read the corpus, train SentencePiece, fix the model config.

    ``langtok``: ``src`` (released LaSS: source-language token on the encoder) or ``tgt``;
    ``mask_output_proj``: mask the tied output projection per pair (released code) or not.
    Both are fixed for the run (stored in run.json). ``device`` (``auto``: CUDA when available)
    is where this process trains and translates; it is not stored: checkpoints load anywhere."""
    if langtok not in LANGTOKS:
        raise ValueError(f"langtok must be one of {LANGTOKS}, got {langtok!r}")
    if os.path.exists(os.path.join(run_dir, RUN_JSON)):
        return open_run(run_dir, device)
    model_overrides["mask_output_proj"] = bool(mask_output_proj)
    data = load_corpus(corpus, pairs, max_train)
    os.makedirs(run_dir, exist_ok=True)
    texts = [s for ex in data.train.values() for pair in ex for s in pair]
    tok = Tokenizer.train(texts, os.path.join(run_dir, "spm"), vocab_size)
    cfg = make_config(config, tok.vocab_size, **model_overrides)
    info = {"corpus": os.path.abspath(data.root) if corpus != "demo" else "demo",
            "pairs": data.pairs, "max_train": max_train, "config_name": config,
            "model": cfg.to_dict(), "tokenizer": "spm.model", "seed": seed, "langtok": langtok,
            "skipped_lines": len(data.skipped)}
    atomic_write(os.path.join(run_dir, RUN_JSON), json.dumps(info, indent=1).encode())
    return Run(run_dir, data, tok, cfg, info, resolve_device(device))


def open_run(run_dir: str, device: str | torch.device = "auto") -> Run:
    """Reopen a run folder (run.json validated by :func:`~.runtime.read_run_json`: a missing,
    corrupt or incomplete file is a one-line ``RunError`` naming it)."""
    info = read_run_json(run_dir)
    data = load_corpus(info["corpus"], info["pairs"], info.get("max_train"))
    tok = Tokenizer(os.path.join(run_dir, info["tokenizer"]))
    try:
        cfg = ModelConfig(**info["model"])
    except TypeError as e:  # unknown or missing fields
        raise RunError(f"run file {os.path.join(run_dir, RUN_JSON)} has an invalid model config "
                       f"({e}); restore it, or start a new --run") from None
    return Run(run_dir, data, tok, cfg, info, resolve_device(device))


def _init_model(run: Run, out: str, init: str | None) -> Seq2Seq:
    """A fresh model, or the (best) weights of stage ``init`` when ``out`` has no checkpoint
    yet."""
    if init and not has_checkpoint(run.path(out, "ckpt")):
        return run.load_model(init)
    return run.new_model()


def _stage(run: Run, out: str, model: Seq2Seq, dirs: list[str], kw: dict,
           name: str | None = None, policy: UpdatePolicy | None = None, **extra) -> dict:
    """Run one training stage: ``kw`` holds TrainConfig fields plus ``progress`` and
    ``valid_limit`` (validation rows per direction)."""
    kw = dict(kw)
    progress = kw.pop("progress", True)
    valid_limit = kw.pop("valid_limit", None)
    cfg = TrainConfig(stage=name or out, directions=dirs, **kw)
    valid = run.valid_encoded(dirs, valid_limit) if cfg.validate_every else None
    return run_stage(run.path(out), model, run.encoded(dirs), cfg, policy=policy, valid=valid,
                     progress=progress, **extra)


def train(run: Run, steps: int, *, out: str = "base", init: str | None = None,
          directions: list[str] | None = None, distributed: bool = True, **kw) -> dict:
    """Dense multilingual training over ``directions`` (default: all), temperature sampling.
    ``distributed=False``: this process alone, also inside a multi-process launch."""
    dirs = directions or run.directions
    return _stage(run, out, _init_model(run, out, init), dirs, dict(kw, steps=steps),
                  distributed=distributed)


def finetune(run: Run, direction: str, steps: int, *, init: str = "base",
             out: str | None = None, distributed: bool = True, **kw) -> dict:
    """Fine-tune the multilingual model (its best checkpoint) on one direction, optimizer and
    schedule reset, to find its mask. ``distributed=False``: this process alone, also under
    ``torchrun`` (ranks fine-tuning different directions)."""
    Direction.parse(direction)
    out = out or f"ft/{direction}"
    kw.setdefault("warmup", 1)
    return _stage(run, out, _init_model(run, out, init), [direction], dict(kw, steps=steps),
                  name=f"finetune {direction}", distributed=distributed)


def _direction_masks(run: Run, bank: MaskBank, stage: str, alpha: float,
                     chunks: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Magnitude masks of ``stage``'s weights for ``bank``'s parameters: the one pruning path of
    :func:`prune` and :func:`extend`. ``chunks`` (q/k/v chunks per name) defaults to
    ``masked_parameters`` of a fresh model, built on the meta device (no memory, no RNG use)."""
    if chunks is None:
        with torch.device("meta"):
            chunks = masked_parameters(Seq2Seq(run.model_config))
    return bank.masks_from_model(run.load_model(stage, device="cpu"), alpha, chunks)


def prune(run: Run, alpha: float, *, directions: list[str] | None = None,
          out: str = "masks.safetensors", random: bool = False, seed: int = 0,
          ft_prefix: str = "ft", shared_from: str | None = None) -> MaskBank:
    """Magnitude masks of each fine-tuned direction (``random``: same sparsity, random;
    ``shared_from=STAGE``: that stage's own magnitude mask for every direction — the
    "pruned, not language-specific" control)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    dirs = directions or run.directions
    template = run.new_model()
    names = masked_parameters(template)
    bank = MaskBank({n: template.get_parameter(n).shape for n in names}, alpha=alpha)
    shared = None
    if shared_from is not None:
        shared = _direction_masks(run, bank, shared_from, alpha, names)
    for d in dirs:
        masks = {n: b.clone() for n, b in shared.items()} if shared is not None else \
            _direction_masks(run, bank, f"{ft_prefix}/{d}", alpha, names)
        bank.add_pair(d, masks)
    if random:
        bank = bank.random_like(alpha, seed=seed)
    bank.save(run.path(out))
    return bank


def load_bank(run: Run, masks: str) -> MaskBank:
    path = masks if os.path.isabs(masks) or os.path.exists(masks) else run.path(masks)
    if not os.path.exists(path):
        raise FileNotFoundError(f"mask bank {masks} not found (looked in {path}); run "
                                "`lass-sparse prune` first")
    return MaskBank.load(path)


def joint(run: Run, masks: str, steps: int, *, init: str = "base", out: str = "joint",
          directions: list[str] | None = None, distributed: bool = True, **kw) -> dict:
    """Structure-aware joint training: language-grouped batches, each with its pair's mask,
    masked AdamW (only that sub-network and the shared unmasked parameters change)."""
    bank = load_bank(run, masks)
    dirs = directions or [d for d in run.directions if d in bank]
    return _stage(run, out, _init_model(run, out, init), dirs, dict(kw, steps=steps),
                  policy=UpdatePolicy(bank=bank), distributed=distributed)


def extend(run: Run, directions: str | list[str], *, masks: str, init: str = "joint",
           ft_steps: int, steps: int, alpha: float | None = None, strict: bool = False,
           ft_init: str = "base", out: str | None = None, distributed: bool = True,
           **kw) -> dict:
    """Add one or more directions (e.g. both of a new pair): fine-tune each from ``ft_init``
    (θ0, as released; or e.g. the joint model) → prune → train only their sub-networks of
    ``init`` together, with language-grouped batches. ``strict``: update only weights outside
    every other pair's mask and freeze the shared parameters, so existing pairs stay
    bit-identical."""
    dirs = [directions] if isinstance(directions, str) else list(directions)
    if not dirs:
        raise ValueError("extend: directions must name at least one direction")
    bank = load_bank(run, masks)
    for d in dirs:
        Direction.parse(d)
        if d in bank:
            raise ValueError(f"{d} already has a mask in {masks}")
    out = out or f"extend/{'+'.join(dirs)}"
    alpha = bank.alpha if alpha is None else alpha
    fts = {}
    for d in dirs:
        ft_out = f"{out}/ft" if len(dirs) == 1 else f"{out}/ft/{d}"
        fts[d] = finetune(run, d, ft_steps, init=ft_init, out=ft_out, distributed=distributed,
                          **kw)
        bank.add_pair(d, _direction_masks(run, bank, ft_out, alpha))
    model = _init_model(run, out, init)
    attach(model, bank)
    policy = UpdatePolicy(bank)
    if strict:
        others = [p for p in bank.pairs if p not in dirs]
        union = bank.union(others) if others else None
        update_bank = MaskBank(dict(bank.shapes), alpha=bank.alpha)
        for d in dirs:
            update_bank.add_pair(d, {n: b & ~union[n] if union else b
                                     for n, b in bank[d].items()})
        # masked weights only: a tied output projection's matrix is also the (shared, frozen)
        # embedding lookup, so it stays frozen too
        registered = dict(model.named_parameters())
        policy = UpdatePolicy(bank, update_bank,
                              tuple(registered[n] for n in bank.names if n in registered))
    res = _stage(run, out, model, dirs, dict(kw, steps=steps), name=f"extend {'+'.join(dirs)}",
                 policy=policy, distributed=distributed)
    bank.save(run.path(out, "masks.safetensors"))
    return {"finetune": fts[dirs[0]] if len(dirs) == 1 else fts, "train": res,
            "masks": run.path(out, "masks.safetensors")}


def _under_mask(model, direction: str, materialize: bool):
    """The direction's masks for a block; with ``materialize``, W ⊙ M kept per layer for it."""
    stack = contextlib.ExitStack()
    if materialize:
        stack.enter_context(materialized(model))
    stack.enter_context(active_pair(model, direction))
    return stack


def translate_texts(run: Run, stage: str, direction: str, texts: list[str], *,
                    masks: str | None = None, beam: int = 4, batch_size: int = 64,
                    lenpen: float = 1.0, materialize: bool = False) -> list[str]:
    """Translate with a stage's model; with ``masks``, under the direction's mask (zero-shot
    directions use the merged X→en encoder / en→Y decoder masks automatically;
    ``materialize``: :func:`lass_sparse.materialized` around the decoding)."""
    from .translate import ensure_pair, translate

    model = run.load_model(stage)
    kw = dict(beam=beam, batch_size=batch_size, lenpen=lenpen, langtok=run.langtok)
    if masks is None:
        return translate(model, run.tok, texts, direction, **kw)
    bank = load_bank(run, masks)
    ensure_pair(bank, direction)
    attach(model, bank)
    with _under_mask(model, direction, materialize):
        return translate(model, run.tok, texts, direction, **kw)


def evaluate(run: Run, systems: dict[str, tuple[str, str | None]], directions: list[str], *,
             split: str = "test", limit: int | None = None, beam: int = 4,
             batch_size: int = 64, progress: bool = True, rows: list[dict] | None = None,
             hyps_out: dict | None = None, materialize: bool = False) -> dict:
    """BLEU, chrF and translation accuracy of each system on each direction.

    ``systems``: name -> (stage, masks file or None for dense); a stage's best checkpoint is used
    when it has one. Zero-shot directions (not in a bank) use merged masks. ``rows``: a
    multi-way test set of one's own (see :func:`~lass_sparse.mt.corpus.read_test_file`) instead
    of the corpus's ``split``. ``hyps_out``: filled with ``{system: {direction: hypotheses}}``
    (for :func:`significance`). ``materialize``: :func:`lass_sparse.materialized` around each
    direction's decoding (one masked copy of the weights at a time). Returns
    ``{system: {direction: {bleu, chrf, acc, ...}}}``.
    """
    from tqdm.auto import tqdm

    from ..mt.corpus import eval_pairs
    from ..mt.metrics import score_translations
    from .translate import ensure_pair, translate

    results: dict[str, dict] = {}
    bar = tqdm(total=len(systems) * len(directions), desc="evaluate", disable=not progress,
               leave=False)
    for name, (stage, masks) in systems.items():
        model = run.load_model(stage)
        bank = load_bank(run, masks) if masks else None
        if bank is not None:
            attach(model, bank)
        results[name] = {}
        for d in directions:
            if rows is not None:
                src, refs = eval_pairs(rows, d, limit)
            else:
                src, refs = run.corpus.eval_set(split, d, limit)
            kw = dict(beam=beam, batch_size=batch_size, langtok=run.langtok)
            if bank is not None:
                ensure_pair(bank, d)
                with _under_mask(model, d, materialize):
                    hyps = translate(model, run.tok, src, d, **kw)
            else:
                hyps = translate(model, run.tok, src, d, **kw)
            tgt = Direction.parse(d).tgt
            results[name][d] = score_translations(hyps, refs, tgt)
            if hyps_out is not None:
                hyps_out.setdefault(name, {})[d] = (hyps, refs)
            bar.update(1)
            bar.set_postfix(system=name, direction=d, bleu=f"{results[name][d]['bleu']:.1f}")
    bar.close()
    return results
