"""Translation directions: ``"en-de"`` is en→de (its own mask; ``"de-en"`` is another one).

Directions travel through the library as strings (MaskBank pair names, corpus keys, CLI
arguments); :class:`Direction` is how a string is read: ``Direction.parse("en-de")`` checks it
once and gives ``.src`` / ``.tgt``, ``str()`` gives the string back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

LANG_CODE = re.compile(r"[a-z]{2,3}")  # use with fullmatch
_DIRECTION = re.compile(r"([a-z]{2,3})-([a-z]{2,3})")
PIVOT = "en"


@dataclass(frozen=True)
class Direction:
    """One translation direction ``src``→``tgt`` (language codes of 2-3 lowercase letters,
    different). Unpacks like a pair: ``src, tgt = Direction.parse("en-de")``."""

    src: str
    tgt: str

    def __post_init__(self) -> None:
        for name, code in (("src", self.src), ("tgt", self.tgt)):
            if not isinstance(code, str) or not LANG_CODE.fullmatch(code):
                raise ValueError(f"Direction: {name} must be a language code of 2-3 lowercase "
                                 f"letters (e.g. 'en'), got {code!r}")
        if self.src == self.tgt:
            raise ValueError(f"Direction: src and tgt must differ, got {self.src!r} for both")

    @classmethod
    def parse(cls, text: str | Direction) -> Direction:
        """``"en-de"`` → ``Direction("en", "de")`` (a Direction is returned as is). Anything else
        raises ``ValueError: not a translation direction: ... (expected like 'en-de')``."""
        if isinstance(text, Direction):
            return text
        m = _DIRECTION.fullmatch(text) if isinstance(text, str) else None
        if not m or m.group(1) == m.group(2):
            raise ValueError(f"not a translation direction: {text!r} (expected like 'en-de')")
        return cls(m.group(1), m.group(2))

    def __str__(self) -> str:
        return f"{self.src}-{self.tgt}"

    def __iter__(self) -> Iterator[str]:
        return iter((self.src, self.tgt))

    def reverse(self) -> Direction:
        """``tgt``→``src``: the other direction of the same language pair."""
        return Direction(self.tgt, self.src)

    def is_english_centric(self, pivot: str = PIVOT) -> bool:
        """True when one side is ``pivot`` (English): a direction trained on its own data."""
        return pivot in (self.src, self.tgt)

    def is_zero_shot(self, pivot: str = PIVOT) -> bool:
        """True when neither side is ``pivot``: X→Y with no direct data (DESIGN §1.6)."""
        return not self.is_english_centric(pivot)

    def via(self, pivot: str = PIVOT) -> tuple[Direction, Direction]:
        """The two English-centric directions a zero-shot X→Y goes through: (X→pivot,
        pivot→Y) — the encoder mask of the first and the decoder mask of the second serve X→Y."""
        if not self.is_zero_shot(pivot):
            raise ValueError(f"Direction.via: {self} is not zero-shot (it has {pivot!r} on one "
                             "side)")
        return Direction(self.src, pivot), Direction(pivot, self.tgt)


def zero_shot_directions(langs: Sequence[str]) -> list[str]:
    """Every X→Y between two different ``langs``, in the order of ``langs``:
    ``["de", "fr"]`` → ``["de-fr", "fr-de"]``."""
    return [str(Direction(a, b)) for a in langs for b in langs if a != b]


def english_centric_directions(langs: Sequence[str], pivot: str = PIVOT) -> list[str]:
    """Both directions of each pivot pair: ``["de", "fr"]`` → ``["en-de", "de-en", "en-fr",
    "fr-en"]`` (``pivot`` itself in ``langs`` is skipped)."""
    return [str(d) for x in langs if x != pivot
            for d in (Direction(pivot, x), Direction(x, pivot))]
