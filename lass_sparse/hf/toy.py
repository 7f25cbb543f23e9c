"""Tiny random Hugging Face seq2seq checkpoints (Marian, M2M100, mBART) with a BPE tokenizer
trained on a local corpus: for tests and offline demos of the recipe (no model hub needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..mt.corpus import load_corpus
from ..mt.direction import Direction
from .data import MBART50_CODES

ARCHS = ("marian", "m2m100", "mbart")


def lang_tokens(arch: str, langs: Sequence[str]) -> list[str]:
    """The language tokens ``arch``'s real tokenizers use for ``langs``."""
    if arch == "marian":
        return [f">>{x}<<" for x in langs]
    if arch == "m2m100":
        return [f"__{x}__" for x in langs]
    if arch == "mbart":
        return [MBART50_CODES[x] for x in langs]
    raise ValueError(f"toy: arch must be one of {ARCHS}, got {arch!r}")


def train_tokenizer(texts: Sequence[str], specials: Sequence[str], vocab_size: int = 400) -> Any:
    """A byte-level-free BPE ``PreTrainedTokenizerFast`` (ids 0-3: <pad> <unk> <s> </s>, then
    ``specials``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    base = ["<pad>", "<unk>", "<s>", "</s>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=base + list(specials), limit_alphabet=120,
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=list(specials))


def make_toy_model(out: str, arch: str = "marian", corpus: str = "demo",
                   pairs: Sequence[str] = ("en-de", "en-fr"), *, vocab_size: int = 400,
                   d_model: int = 32, layers: int = 1, max_train: int = 400,
                   init_std: float = 0.02, seed: int = 0) -> str:
    """Save a random ``arch`` model and its tokenizer (trained on ``corpus``'s ``pairs``) to
    ``out``; returns ``out``. A larger ``init_std`` makes an untrained model's outputs depend
    more on its input (tests)."""
    import transformers as tf

    cp = load_corpus(corpus, list(pairs), max_train=max_train)
    langs = sorted({x for p in cp.pairs for x in Direction.parse(p)})
    texts = [s for ex in cp.train.values() for a, b in ex for s in (a, b)]
    tokenizer = train_tokenizer(texts, lang_tokens(arch, langs), vocab_size)
    kw = dict(vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers,
              decoder_layers=layers, encoder_attention_heads=2, decoder_attention_heads=2,
              encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model,
              max_position_embeddings=256, dropout=0.0, attention_dropout=0.0, init_std=init_std,
              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
              bos_token_id=tokenizer.bos_token_id, forced_eos_token_id=tokenizer.eos_token_id)
    if arch == "marian":
        cfg, cls = tf.MarianConfig(**kw, decoder_start_token_id=tokenizer.pad_token_id), \
            tf.MarianMTModel
    elif arch == "m2m100":
        cfg, cls = tf.M2M100Config(**kw, decoder_start_token_id=tokenizer.eos_token_id), \
            tf.M2M100ForConditionalGeneration
    elif arch == "mbart":
        cfg, cls = tf.MBartConfig(**kw, decoder_start_token_id=tokenizer.eos_token_id), \
            tf.MBartForConditionalGeneration
    else:
        raise ValueError(f"toy: arch must be one of {ARCHS}, got {arch!r}")
    torch.manual_seed(seed)
    model = cls(cfg)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
