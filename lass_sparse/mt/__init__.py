"""Machine-translation plumbing shared by the LaSS pipeline (:mod:`lass_sparse.lass`) and the
Hugging Face stages (:mod:`lass_sparse.hf`); it imports neither, nor the kernels.

- :mod:`~lass_sparse.mt.direction`: :class:`Direction` (``Direction.parse("en-de")``), zero-shot
  and English-centric direction lists.
- :mod:`~lass_sparse.mt.corpus`: the corpus folder (``train.en-XX.tsv.gz``, multi-way
  ``valid``/``test``; ``"demo"``: the bundled subset), evaluation rows, a user's test file.
- :mod:`~lass_sparse.mt.metrics`: BLEU / chrF with signatures, translation accuracy, win ratio,
  paired and pooled bootstrap against a baseline; :mod:`~lass_sparse.mt.report`: their
  markdown tables.
- :mod:`~lass_sparse.mt.corpus_build`: ``lass-sparse corpus build`` (the full corpus from
  Debian packages' translations).
"""

from __future__ import annotations

from .corpus import (
    LANGS,
    Corpus,
    demo_corpus_path,
    eval_pairs,
    load_corpus,
    read_test_file,
    resolve_corpus,
)
from .direction import Direction, english_centric_directions, zero_shot_directions
from .metrics import (
    bleu_chrf,
    paired_bootstrap,
    pooled_bootstrap,
    score_translations,
    significance,
    translation_accuracy,
    win_ratio,
)
from .report import render_significance, render_table

__all__ = [
    "LANGS",
    "Corpus",
    "Direction",
    "bleu_chrf",
    "demo_corpus_path",
    "english_centric_directions",
    "eval_pairs",
    "load_corpus",
    "paired_bootstrap",
    "pooled_bootstrap",
    "read_test_file",
    "render_significance",
    "render_table",
    "resolve_corpus",
    "score_translations",
    "significance",
    "translation_accuracy",
    "win_ratio",
    "zero_shot_directions",
]
