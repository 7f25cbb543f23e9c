"""Language codes per architecture, single-pair datasets and batches, and translation helpers.

How a direction ``s-t`` enters the model (:class:`LangFormat`):

- ``marian`` (multilingual Marian / OPUS-MT): source ``>>t<< x </s>``, target ``y </s>``.
- ``prefix`` (M2M100, NLLB, mBART-50): source ``[s] x </s>``, target ``[t] y </s>``, as the
  models' own tokenizers write them; generation forces ``[t]`` after ``decoder_start_token_id``
  (``generate_kwargs``: ``forced_bos_token_id``; :func:`translate` passes ``[start, t]`` as a
  per-row decoder prompt instead, so one batch can mix target languages).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..mt.direction import Direction

NLLB_CODES = {"en": "eng_Latn", "de": "deu_Latn", "fr": "fra_Latn", "es": "spa_Latn",
              "it": "ita_Latn", "pt": "por_Latn", "ru": "rus_Cyrl", "zh": "zho_Hans",
              "ar": "arb_Arab"}
MBART50_CODES = {"en": "en_XX", "de": "de_DE", "fr": "fr_XX", "es": "es_XX", "it": "it_IT",
                 "pt": "pt_XX", "ru": "ru_RU", "zh": "zh_CN", "ar": "ar_AR"}
SUPPORTED = ("marian", "m2m_100 (M2M100, NLLB)", "mbart (mBART-50)")


@dataclasses.dataclass
class LangFormat:
    """Where the language tokens of a direction go (see the module docstring).

    ``style``: "marian" or "prefix"; ``tokens``: language code -> token (e.g. ``"de": ">>de<<"``);
    ``template``: token for codes not in ``tokens`` (``"__{}__"``; None: only ``tokens``).
    """

    style: str
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    template: str | None = None

    def __post_init__(self) -> None:
        if self.style not in ("marian", "prefix"):
            raise ValueError(f"LangFormat: style must be 'marian' or 'prefix', got {self.style!r}")

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any,
                  codes: Mapping[str, str] | None = None) -> LangFormat:
        """The format of ``model``'s architecture; ``codes`` overrides language -> token."""
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        codes = dict(codes or {})
        if mtype == "marian":
            return cls("marian", codes, ">>{}<<")
        if mtype == "m2m_100":
            if _has_token(tokenizer, "__en__"):
                return cls("prefix", codes, "__{}__")
            return cls("prefix", {**NLLB_CODES, **codes})
        if mtype == "mbart":
            return cls("prefix", {**MBART50_CODES, **codes})
        raise NotImplementedError(
            f"lass_sparse.hf: no language-token format for model_type {mtype!r}; supported: "
            f"{', '.join(SUPPORTED)}. Pass LangFormat('marian'|'prefix', tokens={{...}}) yourself "
            "if your model uses one of those conventions")

    def token(self, lang: str) -> str:
        if lang in self.tokens:
            return self.tokens[lang]
        if self.template is None:
            raise KeyError(f"LangFormat: no token for language {lang!r} (known: "
                           f"{sorted(self.tokens)}); pass codes={{{lang!r}: '...'}}")
        return self.template.format(lang)

    def token_id(self, tokenizer: Any, lang: str) -> int:
        tok = self.token(lang)
        if not _has_token(tokenizer, tok):
            raise KeyError(f"the tokenizer has no language token {tok!r} for {lang!r}: this "
                           f"model cannot be told to read/write {lang!r}")
        return int(tokenizer.convert_tokens_to_ids(tok))

    def source_ids(self, tokenizer: Any, texts: Sequence[str], direction: str,
                   max_len: int = 128) -> list[list[int]]:
        """Encoder inputs of ``texts`` for ``direction``, at most ``max_len`` tokens each."""
        src, tgt = Direction.parse(direction)
        lang = self.token_id(tokenizer, tgt if self.style == "marian" else src)
        body = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [[lang, *x[: max_len - 2], tokenizer.eos_token_id] for x in body]

    def target_ids(self, tokenizer: Any, texts: Sequence[str], direction: str,
                   max_len: int = 128) -> list[list[int]]:
        """Labels of ``texts`` (the target side of ``direction``)."""
        tgt = Direction.parse(direction).tgt
        body = tokenizer(text_target=list(texts), add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        if self.style == "marian":
            return [[*y[: max_len - 1], eos] for y in body]
        lang = self.token_id(tokenizer, tgt)
        return [[lang, *y[: max_len - 2], eos] for y in body]

    def generate_kwargs(self, tokenizer: Any, direction: str) -> dict[str, Any]:
        """``generate()`` arguments that make the model write ``direction``'s target language."""
        if self.style == "marian":
            return {}
        return {"forced_bos_token_id": self.token_id(tokenizer, Direction.parse(direction).tgt)}


def _has_token(tokenizer: Any, tok: str) -> bool:
    i = tokenizer.convert_tokens_to_ids(tok)
    return i is not None and i != tokenizer.unk_token_id


class PairDataset(torch.utils.data.Dataset):
    """Tokenised examples of several directions; ``pair_indices`` feeds
    :class:`~lass_sparse.distributed.PairGroupedSampler`. Each item is
    ``{"input_ids", "labels", "pair"}`` (token id lists)."""

    def __init__(self, examples: Mapping[str, Sequence[tuple[str, str]]], tokenizer: Any,
                 fmt: LangFormat, max_len: int = 128) -> None:
        self.items: list[dict[str, Any]] = []
        self.pair_indices: dict[str, list[int]] = {}
        for direction, pairs in examples.items():
            src = fmt.source_ids(tokenizer, [a for a, _ in pairs], direction, max_len)
            tgt = fmt.target_ids(tokenizer, [b for _, b in pairs], direction, max_len)
            start = len(self.items)
            self.items += [{"input_ids": x, "labels": y, "pair": direction}
                           for x, y in zip(src, tgt)]
            self.pair_indices[direction] = list(range(start, len(self.items)))
        self.pad_id = int(tokenizer.pad_token_id)

    @classmethod
    def from_corpus(cls, corpus: Any, directions: Sequence[str], tokenizer: Any,
                    fmt: LangFormat, max_len: int = 128, limit: int | None = None) -> PairDataset:
        """Training examples of ``directions`` from a :class:`~lass_sparse.mt.corpus.Corpus`."""
        return cls({d: corpus.examples(d)[:limit] for d in directions}, tokenizer, fmt, max_len)

    @property
    def lengths(self) -> list[int]:
        return [max(len(it["input_ids"]), len(it["labels"])) for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


@dataclasses.dataclass
class LaSSCollator:
    """Pads a single-pair batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 padding)
    and ``lass_pair`` (the pair name, consumed by :class:`~lass_sparse.hf.LaSSTrainer`)."""

    pad_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        pairs = {f["pair"] for f in features}
        if len(pairs) != 1:
            raise ValueError(f"LaSSCollator: a batch must hold one pair, got {sorted(pairs)} "
                             "(use LaSSTrainer / PairGroupedSampler batches)")
        src = _pad([f["input_ids"] for f in features], self.pad_id)
        return {"input_ids": src, "attention_mask": src.ne(self.pad_id).long(),
                "labels": _pad([f["labels"] for f in features], -100),
                "lass_pair": pairs.pop()}


def _pad(rows: Sequence[Sequence[int]], value: int) -> Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


@torch.no_grad()
def translate(model: nn.Module, tokenizer: Any, texts: Sequence[str],
              direction: str | Sequence[str], fmt: LangFormat | None = None, *,
              num_beams: int = 4, max_new_tokens: int = 64, batch_size: int = 32,
              max_len: int = 128) -> list[str]:
    """Translate ``texts`` for ``direction`` (one name, or one per text: a mixed batch; on a LaSS
    model each row uses its pair's mask). Dense models translate without masks."""
    from .model import is_lass_model

    fmt = fmt or LangFormat.for_model(model, tokenizer)
    dirs = [direction] * len(texts) if isinstance(direction, str) else list(direction)
    if len(dirs) != len(texts):
        raise ValueError(f"translate: {len(texts)} texts, {len(dirs)} directions")
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        chunk, cdirs = list(texts[i:i + batch_size]), dirs[i:i + batch_size]
        ids = [fmt.source_ids(tokenizer, [t], d, max_len)[0] for t, d in zip(chunk, cdirs)]
        src = _pad(ids, tokenizer.pad_token_id).to(device)
        kw: dict[str, Any] = {"input_ids": src, "attention_mask": src.ne(tokenizer.pad_token_id),
                              "num_beams": num_beams, "max_new_tokens": max_new_tokens}
        single = len(set(cdirs)) == 1
        if fmt.style == "prefix":  # per-row target-language prompt (= forced BOS, row-wise)
            start = model.generation_config.decoder_start_token_id
            kw["decoder_input_ids"] = torch.tensor(
                [[start, fmt.token_id(tokenizer, Direction.parse(d).tgt)] for d in cdirs],
                device=device)
        if is_lass_model(model):
            kw["pair"] = cdirs[0] if single else cdirs
        gen = model.generate(**kw)
        out += tokenizer.batch_decode(gen, skip_special_tokens=True)
    return [s.strip() for s in out]
