"""The LaSS stages on a local Hugging Face seq2seq checkpoint (used by ``lass-sparse hf`` and
``examples/hf_lass.py``): per-pair fine-tune → prune → masked joint training → evaluate (BLEU,
chrF, translation accuracy and the paired bootstrap against a baseline, as the pipeline reports
them: :mod:`lass_sparse.mt.metrics`).

Every stage reads and writes ordinary model folders (``save_pretrained`` + tokenizer); a LaSS
folder also holds ``lass_masks.safetensors`` and ``lass_config.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..mt.corpus import Corpus, load_corpus
from ..mt.direction import Direction
from ..mt.metrics import score_translations, significance
from .data import LangFormat, PairDataset, translate
from .model import CONFIG_FILE, LaSSConfig, from_pretrained, get_lass_model


def load(path: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a local folder; a LaSS folder gives the LaSS model."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist (a local Hugging Face "
                                "checkpoint with its tokenizer is needed; there is no hub access)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        return from_pretrained(None, path), tokenizer
    return AutoModelForSeq2SeqLM.from_pretrained(path), tokenizer


def training_args(out: str, steps: int, *, batch_size: int = 16, lr: float = 5e-4,
                  warmup: int = 0, seed: int = 0, grad_accum: int = 1,
                  **kw: Any) -> Any:
    """``Seq2SeqTrainingArguments`` for one stage (CPU-friendly defaults, no reporting; ``kw``
    overrides any of them)."""
    from transformers import Seq2SeqTrainingArguments

    opts = dict(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=lr, warmup_steps=warmup,
        lr_scheduler_type="inverse_sqrt" if warmup else "constant", seed=seed,
        gradient_accumulation_steps=grad_accum, save_strategy="no", report_to=[],
        logging_steps=max(1, steps // 10), disable_tqdm=True, dataloader_num_workers=0,
        weight_decay=0.0)
    return Seq2SeqTrainingArguments(**{**opts, **kw})


def _corpus(corpus: str | Corpus, directions: Sequence[str], max_train: int | None) -> Corpus:
    if isinstance(corpus, Corpus):
        return corpus
    return load_corpus(corpus, list(directions), max_train=max_train)


def _train(model: nn.Module, tokenizer: Any, corpus: Corpus, directions: Sequence[str],
           out: str, steps: int, fmt: LangFormat | None, max_len: int, temperature: float,
           **targs: Any) -> dict[str, Any]:
    from .trainer import LaSSTrainer

    fmt = fmt or LangFormat.for_model(model, tokenizer)
    ds = PairDataset.from_corpus(corpus, directions, tokenizer, fmt, max_len)
    trainer = LaSSTrainer(model=model, args=training_args(out, steps, **targs),
                          train_dataset=ds, temperature=temperature)
    res = trainer.train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"out": out, "steps": res.global_step, "train_loss": res.training_loss}


def finetune(model_path: str, corpus: str | Corpus, direction: str, out: str, steps: int, *,
             fmt: LangFormat | None = None, max_len: int = 128, max_train: int | None = None,
             **targs: Any) -> dict[str, Any]:
    """LaSS step 2: fine-tune a dense copy of ``model_path`` on ``direction`` only → ``out``."""
    model, tokenizer = load(model_path)
    return _train(model, tokenizer, _corpus(corpus, [direction], max_train), [direction], out,
                  steps, fmt, max_len, 1.0, **targs)


def prune(model_path: str, finetuned: Mapping[str, str], out: str, config: LaSSConfig) -> Any:
    """LaSS step 3: masks of each fine-tuned folder (``{direction: folder}``) at
    ``config.alpha``, attached to ``model_path``'s weights; saved to ``out``. Returns the model."""
    model, tokenizer = load(model_path)
    model = get_lass_model(model, config)
    for direction, path in finetuned.items():
        ft, _ = load(path)
        model.add_pair(direction, ft)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def joint(model_path: str, corpus: str | Corpus, directions: Sequence[str] | None, out: str,
          steps: int, *, temperature: float = 5.0, fmt: LangFormat | None = None,
          max_len: int = 128, max_train: int | None = None, **targs: Any) -> dict[str, Any]:
    """LaSS step 4: masked joint training of a LaSS folder on its pairs (or ``directions``)."""
    model, tokenizer = load(model_path)
    if not hasattr(model, "lass_bank"):
        raise ValueError(f"{model_path} is not a LaSS model folder (run prune first)")
    directions = list(directions or model.pairs)
    return _train(model, tokenizer, _corpus(corpus, directions, max_train), directions, out,
                  steps, fmt, max_len, temperature, **targs)


def evaluate(model_path: str | tuple[nn.Module, Any], corpus: str | Corpus,
             directions: Sequence[str], *, split: str = "test", limit: int | None = 100,
             num_beams: int = 4, max_new_tokens: int = 64, fmt: LangFormat | None = None,
             hyps_out: dict | None = None) -> dict[str, Any]:
    """BLEU, chrF (with sacrebleu signatures) and translation accuracy of one model on each of
    ``directions`` (under each pair's mask on a LaSS model), on the first ``limit`` rows of the
    corpus' multi-way ``split`` — :func:`~lass_sparse.mt.metrics.score_translations`, as the
    pipeline reports them. Returns ``{direction: {bleu, chrf, acc, n, bleu_signature,
    chrf_signature}, "mean": {bleu, chrf, acc}}``. ``hyps_out``: filled with ``{direction:
    (hypotheses, references)}`` (for :func:`~lass_sparse.mt.metrics.significance`)."""
    model, tokenizer = load(model_path) if isinstance(model_path, str) else model_path
    cp = _corpus(corpus, [], None) if isinstance(corpus, str) else corpus
    fmt = fmt or LangFormat.for_model(model, tokenizer)
    res: dict[str, Any] = {}
    for d in directions:
        src, ref = cp.eval_set(split, d, limit)
        hyp = translate(model, tokenizer, src, d, fmt, num_beams=num_beams,
                        max_new_tokens=max_new_tokens)
        res[d] = score_translations(hyp, ref, Direction.parse(d).tgt)
        if hyps_out is not None:
            hyps_out[d] = (hyp, ref)
    res["mean"] = {m: sum(res[d][m] for d in directions) / max(len(directions), 1)
                   for m in ("bleu", "chrf", "acc")}
    return res


def compare(systems: Mapping[str, str | tuple[nn.Module, Any]], corpus: str | Corpus,
            directions: Sequence[str], *, baseline: str, n_samples: int = 1000,
            seed: int | None = 12345, **eval_kw: Any) -> dict[str, Any]:
    """:func:`evaluate` every system (name -> model folder or (model, tokenizer)) on the same
    rows, then the paired bootstrap of each against ``baseline`` per direction and pooled over
    ``directions`` (:func:`~lass_sparse.mt.metrics.significance`, sacrebleu's ``--paired-bs``).
    Returns ``{"scores": {system: evaluate(...)}, "significance": {system: {"directions": {d:
    test}, "pooled": test}}}``; ``eval_kw`` goes to :func:`evaluate`."""
    if baseline not in systems:
        raise KeyError(f"compare: baseline {baseline!r} is not one of the systems "
                       f"{sorted(systems)}")
    loaded = corpus if isinstance(corpus, Corpus) else _corpus(corpus, [], None)
    hyps: dict[str, dict] = {}
    scores = {name: evaluate(m, loaded, directions, hyps_out=hyps.setdefault(name, {}),
                             **eval_kw)
              for name, m in systems.items()}
    return {"scores": scores, "significance": significance(hyps, baseline, directions,
                                                           n_samples=n_samples, seed=seed)}


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
