"""LaSS on Hugging Face seq2seq models (optional extra: ``pip install "lass_sparse[hf]"``).

PEFT-style API: ``get_lass_model(model, LaSSConfig(alpha=0.7))`` converts a ``transformers`` model
in place; ``model.add_pair("en-de", finetuned_model)``, ``model.set_pair("en-de")`` /
``with model.use_pair("en-de"):``, ``model.generate(..., pair=...)``, ``model.save_pretrained(dir)``
and ``from_pretrained(base, dir)``. Training: :class:`LaSSTrainer` (``Seq2SeqTrainer`` with
single-pair batches and :class:`~lass_sparse.optim.MaskedAdamW`).
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('lass_sparse.hf needs transformers: pip install "lass_sparse[hf]"') from e

from .data import LangFormat, LaSSCollator, PairDataset, translate
from .model import (
    CONFIG_FILE,
    MASKS_FILE,
    LaSSConfig,
    LaSSModelMixin,
    from_pretrained,
    get_lass_model,
    is_lass_model,
)

__all__ = [
    "CONFIG_FILE",
    "MASKS_FILE",
    "LaSSCollator",
    "LaSSConfig",
    "LaSSModelMixin",
    "LaSSTrainer",
    "LaSSTrainerMixin",
    "LangFormat",
    "PairDataset",
    "from_pretrained",
    "get_lass_model",
    "is_lass_model",
    "translate",
]


def __getattr__(name: str):  # the Trainer imports accelerate: load it on first use
    if name in ("LaSSTrainer", "LaSSTrainerMixin"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
