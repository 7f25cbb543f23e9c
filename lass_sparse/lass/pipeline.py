"""The LaSS stages as Python functions over a run folder (the CLI calls these).

Run folder layout::

    run.json            corpus, model config, tokenizer
    spm.model           SentencePiece model trained on the training text
    <stage>/ckpt/       model + optimizer + state (resumable), <stage>/log.jsonl
    masks*.safetensors  MaskBanks written by `prune` (and `extend`)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..masks import MaskBank, atomic_write, magnitude_chunks
from ..nn import active_pair, attach, masked_parameters
from .checkpoint import has_checkpoint, load_checkpoint
from .data import Corpus, load_corpus, parse_direction
from .model import ModelConfig, Seq2Seq, make_config
from .tokenizer import Tokenizer
from .train import Encoded, TrainConfig, run_stage

RUN_JSON = "run.json"


@dataclass
class Run:
    dir: str
    corpus: Corpus
    tok: Tokenizer
    model_config: ModelConfig
    info: dict
    _encoded: dict = field(default_factory=dict)

    @property
    def directions(self) -> list[str]:
        return self.corpus.directions

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def new_model(self) -> Seq2Seq:
        torch.manual_seed(self.info.get("seed", 0))
        return Seq2Seq(self.model_config)

    def load_model(self, stage: str) -> Seq2Seq:
        ckpt = self.path(stage, "ckpt")
        if not has_checkpoint(ckpt):
            raise FileNotFoundError(f"no checkpoint for stage {stage!r} in {self.dir} "
                                    f"(expected {ckpt}/state.json); run that stage first")
        model = Seq2Seq(self.model_config)
        load_checkpoint(ckpt, model)
        return model

    def encoded(self, directions: list[str]) -> Encoded:
        key = tuple(directions)
        if key not in self._encoded:
            self._encoded[key] = Encoded(self.corpus, self.tok, list(directions),
                                         self.model_config.max_len)
        return self._encoded[key]


def prepare(run_dir: str, corpus: str = "demo", config: str = "tiny", vocab_size: int = 4000,
            pairs: list[str] | None = None, max_train: int | None = None, seed: int = 0,
            **model_overrides) -> Run:
    """Create (or reopen) a run: read the corpus, train SentencePiece, fix the model config."""
    if os.path.exists(os.path.join(run_dir, RUN_JSON)):
        return open_run(run_dir)
    data = load_corpus(corpus, pairs, max_train)
    os.makedirs(run_dir, exist_ok=True)
    texts = [s for ex in data.train.values() for pair in ex for s in pair]
    tok = Tokenizer.train(texts, os.path.join(run_dir, "spm"), vocab_size)
    cfg = make_config(config, tok.vocab_size, **model_overrides)
    info = {"corpus": os.path.abspath(data.root) if corpus != "demo" else "demo",
            "pairs": data.pairs, "max_train": max_train, "config_name": config,
            "model": cfg.to_dict(), "tokenizer": "spm.model", "seed": seed,
            "skipped_lines": len(data.skipped)}
    atomic_write(os.path.join(run_dir, RUN_JSON), json.dumps(info, indent=1).encode())
    return Run(run_dir, data, tok, cfg, info)


def open_run(run_dir: str) -> Run:
    path = os.path.join(run_dir, RUN_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a run folder (no {RUN_JSON}); start one with "
                                f"`lass-sparse train --run {run_dir}`")
    with open(path) as f:
        info = json.load(f)
    data = load_corpus(info["corpus"], info["pairs"], info["max_train"])
    tok = Tokenizer(os.path.join(run_dir, info["tokenizer"]))
    return Run(run_dir, data, tok, ModelConfig(**info["model"]), info)


def _init_model(run: Run, out: str, init: str | None) -> Seq2Seq:
    """A fresh model, or the weights of stage ``init`` when ``out`` has no checkpoint yet."""
    if init and not has_checkpoint(run.path(out, "ckpt")):
        return run.load_model(init)
    return run.new_model()


def train(run: Run, steps: int, *, out: str = "base", init: str | None = None,
          directions: list[str] | None = None, **kw) -> dict:
    """Dense multilingual training over ``directions`` (default: all), temperature sampling."""
    dirs = directions or run.directions
    model = _init_model(run, out, init)
    progress = kw.pop("progress", True)
    cfg = TrainConfig(stage=out, directions=dirs, steps=steps, **kw)
    return run_stage(run.path(out), model, run.encoded(dirs), cfg, progress=progress)


def finetune(run: Run, direction: str, steps: int, *, init: str = "base",
             out: str | None = None, **kw) -> dict:
    """Fine-tune the multilingual model on one direction (to find its mask)."""
    parse_direction(direction)
    out = out or f"ft/{direction}"
    model = _init_model(run, out, init)
    kw.setdefault("warmup", 1)
    progress = kw.pop("progress", True)
    cfg = TrainConfig(stage=f"finetune {direction}", directions=[direction], steps=steps, **kw)
    return run_stage(run.path(out), model, run.encoded([direction]), cfg, progress=progress)


def prune(run: Run, alpha: float, *, directions: list[str] | None = None,
          out: str = "masks.safetensors", random: bool = False, seed: int = 0,
          ft_prefix: str = "ft") -> MaskBank:
    """Magnitude masks of each fine-tuned direction (``--random``: same sparsity, random)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    dirs = directions or run.directions
    template = run.new_model()
    names = masked_parameters(template)
    bank = MaskBank({n: template.get_parameter(n).shape for n in names}, alpha=alpha)
    for d in dirs:
        model = run.load_model(f"{ft_prefix}/{d}")
        bank.add_pair(d, bank.masks_from_model(model, alpha, names))
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
          directions: list[str] | None = None, **kw) -> dict:
    """Structure-aware joint training: language-grouped batches, each with its pair's mask,
    masked AdamW (only that sub-network and the shared unmasked parameters change)."""
    bank = load_bank(run, masks)
    dirs = directions or [d for d in run.directions if d in bank]
    model = _init_model(run, out, init)
    progress = kw.pop("progress", True)
    cfg = TrainConfig(stage=out, directions=dirs, steps=steps, **kw)
    return run_stage(run.path(out), model, run.encoded(dirs), cfg, bank=bank, progress=progress)


def extend(run: Run, directions: str | list[str], *, masks: str, init: str = "joint",
           ft_steps: int, steps: int, alpha: float | None = None, strict: bool = False,
           out: str | None = None, **kw) -> dict:
    """Add one or more directions (e.g. both of a new pair): fine-tune each → prune → train only
    their sub-networks, together, with language-grouped batches. ``strict``: update only weights
    outside every other pair's mask and freeze the shared parameters, so existing pairs stay
    bit-identical."""
    dirs = [directions] if isinstance(directions, str) else list(directions)
    if not dirs:
        raise ValueError("extend: directions must name at least one direction")
    bank = load_bank(run, masks)
    for d in dirs:
        parse_direction(d)
        if d in bank:
            raise ValueError(f"{d} already has a mask in {masks}")
    out = out or f"extend/{'+'.join(dirs)}"
    alpha = bank.alpha if alpha is None else alpha
    fts = {}
    for d in dirs:
        ft_out = f"{out}/ft" if len(dirs) == 1 else f"{out}/ft/{d}"
        fts[d] = finetune(run, d, ft_steps, init=init, out=ft_out, **kw)
        ft_model = run.load_model(ft_out)
        chunks = masked_parameters(ft_model)
        bank.add_pair(d, {n: magnitude_chunks(ft_model.get_parameter(n).detach(), alpha,
                                              chunks[n]) for n in bank.names})
    model = _init_model(run, out, init)
    attach(model, bank)
    update_bank = params = None
    if strict:
        others = [p for p in bank.pairs if p not in dirs]
        union = bank.union(others) if others else None
        update_bank = MaskBank(dict(bank.shapes), alpha=bank.alpha)
        for d in dirs:
            update_bank.add_pair(d, {n: b & ~union[n] if union else b
                                     for n, b in bank[d].items()})
        params = [model.get_parameter(n) for n in bank.names]
    progress = kw.pop("progress", True)
    cfg = TrainConfig(stage=f"extend {'+'.join(dirs)}", directions=dirs, steps=steps, **kw)
    res = run_stage(run.path(out), model, run.encoded(dirs), cfg, bank=bank,
                    update_bank=update_bank, params=params, progress=progress)
    bank.save(run.path(out, "masks.safetensors"))
    return {"finetune": fts[dirs[0]] if len(dirs) == 1 else fts, "train": res,
            "masks": run.path(out, "masks.safetensors")}


def translate_texts(run: Run, stage: str, direction: str, texts: list[str], *,
                    masks: str | None = None, beam: int = 4, batch_size: int = 64,
                    lenpen: float = 1.0) -> list[str]:
    """Translate with a stage's model; with ``masks``, under the direction's mask (zero-shot
    directions use the merged X→en encoder / en→Y decoder masks automatically)."""
    from .translate import ensure_pair, translate

    model = run.load_model(stage)
    if masks is None:
        return translate(model, run.tok, texts, direction, beam=beam, batch_size=batch_size,
                         lenpen=lenpen)
    bank = load_bank(run, masks)
    ensure_pair(bank, direction)
    attach(model, bank)
    with active_pair(model, direction):
        return translate(model, run.tok, texts, direction, beam=beam, batch_size=batch_size,
                         lenpen=lenpen)


def evaluate(run: Run, systems: dict[str, tuple[str, str | None]], directions: list[str], *,
             split: str = "test", limit: int | None = None, beam: int = 4,
             batch_size: int = 64, progress: bool = True) -> dict:
    """BLEU, chrF and translation accuracy of each system on each direction.

    ``systems``: name -> (stage, masks file or None for dense). Zero-shot directions (not in a
    bank) use merged masks. Returns ``{system: {direction: {bleu, chrf, acc, ...}}}``.
    """
    from tqdm.auto import tqdm

    from .evaluate import bleu_chrf, translation_accuracy
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
            src, refs = run.corpus.eval_set(split, d, limit)
            if bank is not None:
                ensure_pair(bank, d)
                with active_pair(model, d):
                    hyps = translate(model, run.tok, src, d, beam=beam, batch_size=batch_size)
            else:
                hyps = translate(model, run.tok, src, d, beam=beam, batch_size=batch_size)
            tgt = parse_direction(d)[1]
            results[name][d] = {**bleu_chrf(hyps, refs, tgt),
                                "acc": translation_accuracy(hyps, tgt), "n": len(hyps)}
            bar.update(1)
            bar.set_postfix(system=name, direction=d, bleu=f"{results[name][d]['bleu']:.1f}")
    bar.close()
    return results


def render_table(results: dict, directions: list[str], baseline: str | None = None) -> str:
    """Markdown: one row per direction, BLEU / chrF / ACC per system, averages, win ratios."""
    from .evaluate import win_ratio

    systems = list(results)
    head = ["direction"] + [f"{s} {m}" for s in systems for m in ("BLEU", "chrF", "ACC")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in directions:
        cells = [d]
        for s in systems:
            r = results[s][d]
            cells += [f"{r['bleu']:.1f}", f"{r['chrf']:.1f}", f"{r['acc']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    avg = ["**average**"]
    for s in systems:
        for m in ("bleu", "chrf", "acc"):
            v = sum(results[s][d][m] for d in directions) / len(directions)
            avg.append(f"{v:.2f}" if m == "acc" else f"{v:.1f}")
    lines.append("| " + " | ".join(avg) + " |")
    if baseline and baseline in results:
        lines.append("")
        base = {d: results[baseline][d]["bleu"] for d in directions}
        for s in systems:
            if s != baseline:
                w = win_ratio({d: results[s][d]["bleu"] for d in directions}, base)
                lines.append(f"- win ratio of {s} over {baseline} (BLEU): {w:.0%}")
    return "\n".join(lines)
