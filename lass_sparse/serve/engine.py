"""Translation engines behind the server: one model, many directions, batches that mix them.

An engine turns a request's texts into :class:`Source` rows (checking the model's limits) and
runs a list of rows, whatever their directions, as one batch. :class:`NativeEngine` serves a
LaSS run folder (the library's Seq2Seq: one encoder pass and one decoder forward per step for the
whole batch, each row under its own pair's mask through the segmented kernels);
:class:`HFEngine` serves a Hugging Face LaSS folder through ``generate(pair=[...])``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..mt.direction import Direction

PIVOT = "en"


class UnknownPair(KeyError):
    """A direction the engine does not serve (the message lists those it does)."""

    def __str__(self) -> str:
        return str(self.args[0])


class TooLong(ValueError):
    """A text longer than the model takes."""


@dataclass
class Source:
    """One sentence of a request, ready for a batch: ``ids`` the encoder input, ``limit`` the
    decoding steps it gets (native engine), ``text`` the raw text (Hugging Face engine)."""

    pair: str
    ids: list[int]
    limit: int
    text: str = ""


def directions_served(supervised: Sequence[str], pivot: str = PIVOT,
                      zero_shot: bool = True) -> tuple[list[str], list[str]]:
    """(supervised, zero-shot) directions: every X→Y with X→pivot and pivot→Y supervised is served
    zero-shot through the merged masks (DESIGN §1.6)."""
    sup = list(supervised)
    if not zero_shot:
        return sup, []
    have = set(sup)
    langs = sorted({x for d in sup for x in Direction.parse(d)} - {pivot})
    zs = [f"{a}-{b}" for a in langs for b in langs
          if a != b and f"{a}-{b}" not in have
          and f"{a}-{pivot}" in have and f"{pivot}-{b}" in have]
    return sup, zs


def select_pairs(supervised: list[str], zero_shot: list[str],
                 wanted: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Restrict the served directions to ``wanted`` (None: all); an unknown one is an error
    naming what the model can serve."""
    if not wanted:
        return supervised, zero_shot
    known = supervised + zero_shot
    bad = [p for p in wanted if p not in known]
    if bad:
        raise ValueError(f"--pairs: {bad} cannot be served by this model; it serves "
                         f"{', '.join(known)}")
    keep = set(wanted)
    return [p for p in supervised if p in keep], [p for p in zero_shot if p in keep]


class Engine:
    """What the server needs from a model. Subclasses set the attributes in ``__init__``."""

    kind: str = ""
    description: str = ""
    device: torch.device = torch.device("cpu")
    supervised: list[str]
    zero_shot: list[str]
    max_src_tokens: int  # encoder input tokens, language tag and EOS included
    max_output_tokens: int  # the largest max_len a request may ask for

    @property
    def pairs(self) -> list[str]:
        return self.supervised + self.zero_shot

    def _set_pairs(self, supervised: list[str], zero_shot: list[str]) -> None:
        if not supervised + zero_shot:
            raise ValueError("no direction left to serve")
        self.supervised, self.zero_shot = supervised, zero_shot
        self._known = frozenset(supervised + zero_shot)

    def check_pair(self, pair: str) -> str:
        """``pair`` if served, else :class:`UnknownPair` listing the served ones."""
        if pair not in self._known:
            raise UnknownPair(f"unknown pair {pair!r}; this server translates "
                              f"{', '.join(self.pairs)}")
        return pair

    def prepare(self, pair: str, texts: Sequence[str], max_len: int | None) -> list[Source]:
        """Rows for ``texts`` along ``pair``; raises :class:`UnknownPair` or :class:`TooLong`
        (naming the text and the limit)."""
        raise NotImplementedError

    def batch_key(self, beam: int, max_len: int | None) -> Hashable:
        """Requests with equal keys may share a batch (the beam width is one per batch)."""
        return (beam,)

    def run(self, rows: Sequence[Source], beam: int, max_len: int | None,
            on_row: Callable[[int, str], None] | None = None) -> list[str]:
        """Translate ``rows`` (any mix of pairs) as one batch; one string per row.
        ``on_row(i, text)``, where the engine can, as soon as row ``i`` is final."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"engine": self.kind, "model": self.description, "device": str(self.device)}


def _too_long(i: int, n: int, limit: int) -> TooLong:
    return TooLong(f"text[{i}] is {n} tokens long; the model takes at most {limit} tokens a "
                   f"sentence (max_len {limit + 2} with the language tag and EOS)")


class NativeEngine(Engine):
    """A LaSS run folder's model (``stage``) with a MaskBank (``masks``; None: the dense model
    for every direction). Zero-shot directions get their merged masks at start-up, so the bank
    does not change while serving."""

    kind = "lass"

    def __init__(self, model: Any, tok: Any, bank: Any | None, *, langtok: str = "src",
                 directions: Sequence[str] | None = None, zero_shot: bool = True,
                 pairs: Sequence[str] | None = None, lenpen: float = 1.0,
                 description: str = "") -> None:
        from ..lass.device import model_device
        from ..lass.translate import ensure_pair
        from ..nn import attach

        self.model, self.tok, self.bank = model.eval(), tok, bank
        self.langtok, self.lenpen = langtok, lenpen
        self.description = description
        self.device = model_device(model)
        if bank is not None:
            sup = list(bank.pairs)
        else:
            sup = list(directions or [])
            if not sup:
                raise ValueError("NativeEngine: a dense model needs directions=[...]")
        sup, zs = directions_served(sup, PIVOT, zero_shot)
        self._set_pairs(*select_pairs(sup, zs, pairs))
        if bank is not None:
            for p in self.zero_shot:
                ensure_pair(bank, p, PIVOT)
            attach(model, bank)
        self._index = {p: i for i, p in enumerate(self.pairs)}
        self._all = tuple(self.pairs)
        cfg = model.config
        self.max_src_tokens = cfg.max_len
        self.max_output_tokens = cfg.max_len - 1
        self._bos = {p: tok.lang_id(Direction.parse(p).tgt) for p in self.pairs}
        self._lock = threading.Lock()  # one batch at a time on the model

    @classmethod
    def from_run(cls, run_dir: str, stage: str = "joint", masks: str | None = None, *,
                 device: str = "auto", **kw: Any) -> NativeEngine:
        """Load ``run_dir``'s ``stage`` (its best checkpoint, else its last) and ``masks``
        (a path, or a file name in the run folder). The training corpus is not needed."""
        from ..lass.device import resolve_device
        from ..lass.model import ModelConfig
        from ..lass.pipeline import RUN_JSON, Run, load_bank
        from ..lass.tokenizer import Tokenizer

        path = os.path.join(run_dir, RUN_JSON)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--run {run_dir}: not a run folder (no {RUN_JSON})")
        with open(path) as f:
            info = json.load(f)
        try:
            cfg = ModelConfig(**info["model"])
            tok = Tokenizer(os.path.join(run_dir, info.get("tokenizer", "spm.model")))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid run.json ({e})") from None
        run = Run(run_dir, None, tok, cfg, info, resolve_device(device))  # type: ignore[arg-type]
        ckpt = run.checkpoint(stage)
        if not os.path.isdir(ckpt):
            stages = sorted(d for d in os.listdir(run_dir)
                            if os.path.isdir(os.path.join(run_dir, d, "ckpt")))
            raise FileNotFoundError(f"--stage {stage}: {run_dir} has no such stage (stages with "
                                    f"a checkpoint: {', '.join(stages) or 'none'})")
        model = run.load_model(stage)
        bank = load_bank(run, masks) if masks else None
        if bank is not None:
            bank = bank.to(run.device)
        dirs = [d for p in info.get("pairs", []) for d in (p, str(Direction.parse(p).reverse()))]
        desc = f"{os.path.abspath(run_dir)} stage {stage}" + (f", masks {masks}" if masks else
                                                               ", dense")
        return cls(model, tok, bank, langtok=info.get("langtok", "tgt"), directions=dirs,
                   description=desc, **kw)

    def prepare(self, pair: str, texts: Sequence[str], max_len: int | None) -> list[Source]:
        from ..lass.encoding import encode_source, encoder_lang
        from ..lass.translate import translate_limits

        self.check_pair(pair)
        lang = encoder_lang(pair, self.langtok)
        body = self.tok.encode(list(texts))
        limit = self.max_src_tokens - 2
        for i, ids in enumerate(body):
            if len(ids) > limit:
                raise _too_long(i, len(ids), limit)
        src = [encode_source(self.tok, ids, lang, self.max_src_tokens) for ids in body]
        # the steps offline `translate` gives each sentence (its batch's longest source)
        limits = ([max_len] * len(src) if max_len else
                  translate_limits([len(s) for s in src], self.max_src_tokens))
        return [Source(pair, s, lim) for s, lim in zip(src, limits)]

    def run(self, rows: Sequence[Source], beam: int, max_len: int | None,
            on_row: Callable[[int, str], None] | None = None) -> list[str]:
        from ..lass.encoding import pad_batch
        from ..lass.translate import beam_search
        from ..nn import active_pair

        # rows grouped by pair: the segmented kernels then need no gather/scatter per layer
        order = sorted(range(len(rows)), key=lambda i: self._index[rows[i].pair])
        rows = [rows[i] for i in order]
        src = pad_batch([r.ids for r in rows]).to(self.device)
        kw: dict[str, Any] = dict(max_len=[r.limit for r in rows], lenpen=self.lenpen)
        if on_row is not None:
            kw["on_done"] = lambda i, hyp: on_row(order[i], self.tok.decode([hyp])[0])
        bos = [self._bos[r.pair] for r in rows]
        with self._lock:
            if self.bank is None:
                hyps = beam_search(self.model, src, bos, beam, **kw)
            elif rows[0].pair == rows[-1].pair:  # one pair: the single-pair kernels, as offline
                with active_pair(self.model, rows[0].pair):
                    hyps = beam_search(self.model, src, bos, beam, **kw)
            else:
                ids = torch.tensor([self._index[r.pair] for r in rows], dtype=torch.long,
                                   device=self.device)
                hyps = beam_search(self.model, src, bos, beam, pairs=self._all, pair_ids=ids,
                                   **kw)
        out = [""] * len(rows)
        for i, text in zip(order, self.tok.decode(hyps)):
            out[i] = text
        return out

    def info(self) -> dict[str, Any]:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        masks = 0
        if self.bank is not None:
            masks = sum(b.numel() * b.element_size() for p in self.pairs
                        for b in self.bank[p].values())
        return {**super().info(), "parameter_bytes": params, "mask_bytes": masks}


class HFEngine(Engine):
    """A Hugging Face LaSS folder (``save_pretrained`` of a LaSS model, with its tokenizer):
    mixed-pair batches through ``generate(pair=[...])``; ``max_len`` is ``max_new_tokens``."""

    kind = "hf"

    def __init__(self, path: str, *, device: str = "auto", zero_shot: bool = True,
                 pairs: Sequence[str] | None = None, max_src_tokens: int = 128,
                 max_new_tokens: int = 64) -> None:
        from ..hf.data import LangFormat
        from ..hf.model import CONFIG_FILE, is_lass_model
        from ..hf.pipeline import load
        from ..lass.device import resolve_device

        if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            raise ValueError(f"--hf-model {path}: not a LaSS model folder (no {CONFIG_FILE}); "
                             "serve one written by `lass-sparse hf prune` or `hf joint`")
        model, tokenizer = load(path)
        if not is_lass_model(model):
            raise ValueError(f"--hf-model {path}: the model did not load with its LaSS masks")
        self.device = resolve_device(device)
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        self.fmt = LangFormat.for_model(model, tokenizer)
        self.description = os.path.abspath(path)
        sup, zs = directions_served(list(model.pairs), PIVOT, zero_shot)
        if zs:
            try:
                model._lass_prefixes()
            except NotImplementedError:
                zs = []
        self._set_pairs(*select_pairs(sup, zs, pairs))
        for p in self.zero_shot:
            model.resolve_pair(p)
        self.max_src_tokens = max_src_tokens
        self.max_output_tokens = self.default_new_tokens = max_new_tokens
        self._lock = threading.Lock()

    def prepare(self, pair: str, texts: Sequence[str], max_len: int | None) -> list[Source]:
        self.check_pair(pair)
        body = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        limit = self.max_src_tokens - 2
        for i, ids in enumerate(body):
            if len(ids) > limit:
                raise _too_long(i, len(ids), limit)
        steps = max_len or self.default_new_tokens
        return [Source(pair, ids, steps, text) for ids, text in zip(body, texts)]

    def batch_key(self, beam: int, max_len: int | None) -> Hashable:
        return (beam, max_len or self.default_new_tokens)  # one max_new_tokens per generate()

    def run(self, rows: Sequence[Source], beam: int, max_len: int | None,
            on_row: Callable[[int, str], None] | None = None) -> list[str]:
        from ..hf.data import translate

        with self._lock:
            return translate(self.model, self.tokenizer, [r.text for r in rows],
                             [r.pair for r in rows], self.fmt, num_beams=beam,
                             max_new_tokens=rows[0].limit, batch_size=len(rows),
                             max_len=self.max_src_tokens)
