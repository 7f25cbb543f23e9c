"""SentencePiece tokenizer with language tokens ``<2xx>`` as user-defined symbols."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from ..mt.corpus import LANGS

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def lang_token(lang: str) -> str:
    return f"<2{lang}>"


class Tokenizer:
    """A trained SentencePiece model (``path``: its ``.model`` file)."""

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        if not os.path.exists(path):
            raise FileNotFoundError(f"SentencePiece model {path} not found")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self._lang = {lang: self.sp.piece_to_id(lang_token(lang)) for lang in LANGS}

    @classmethod
    def train(cls, texts: Iterable[str], model_prefix: str, vocab_size: int = 4000,
              langs: Sequence[str] = LANGS) -> Tokenizer:
        """Train a shared unigram model on ``texts``; writes ``model_prefix.model``."""
        import sentencepiece as spm

        os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_prefix=model_prefix,
            vocab_size=vocab_size, model_type="unigram", character_coverage=0.9995,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            user_defined_symbols=[lang_token(lang) for lang in langs],
            hard_vocab_limit=False, num_threads=2, minloglevel=2,
        )
        return cls(model_prefix + ".model")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def lang_id(self, lang: str) -> int:
        try:
            return self._lang[lang]
        except KeyError:
            raise KeyError(f"no language token for {lang!r} (known: {list(self._lang)})") from None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        specials = {PAD, BOS, EOS, *self._lang.values()}
        return [self.sp.decode([i for i in seq if i not in specials]) for seq in ids]
