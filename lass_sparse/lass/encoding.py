"""Model inputs from token ids: the encoder's language token, padding. Shared by training and
translation (no training code needed to translate)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..mt.direction import Direction
from .tokenizer import EOS, PAD, Tokenizer


def pad_batch(seqs: list[list[int]]) -> Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


LANGTOKS = ("src", "tgt")


def encoder_lang(direction: str, langtok: str) -> str:
    """The language whose token starts the encoder input: the source's (``src``, the released
    LaSS configs' ``encoder_langtok: src``) or the target's (``tgt``, Johnson et al.)."""
    if langtok not in LANGTOKS:
        raise ValueError(f"langtok must be 'src' or 'tgt', got {langtok!r}")
    s, t = Direction.parse(direction)
    return s if langtok == "src" else t


def encode_source(tok: Tokenizer, ids: list[int], lang: str, max_len: int) -> list[int]:
    """Encoder input: ``lang``'s token (see :func:`encoder_lang`), the sentence, EOS."""
    return [tok.lang_id(lang)] + ids[: max_len - 2] + [EOS]
