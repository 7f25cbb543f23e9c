"""BLEU / chrF (sacrebleu, with signatures), translation accuracy (langid), win ratio."""

from __future__ import annotations

from functools import lru_cache

from .data import LANGS


def bleu_chrf(hyps: list[str], refs: list[str], tgt_lang: str) -> dict:
    """Corpus BLEU (tokenizer ``zh`` for Chinese, ``13a`` otherwise) and chrF, with signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    bleu = BLEU(tokenize="zh" if tgt_lang == "zh" else "13a")
    chrf = CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


@lru_cache(maxsize=1)
def _identifier():
    from langid.langid import LanguageIdentifier, model

    ident = LanguageIdentifier.from_modelstring(model, norm_probs=False)
    ident.set_languages(list(LANGS))
    return ident


def translation_accuracy(hyps: list[str], tgt_lang: str) -> float:
    """Share of outputs whose language (langid, restricted to the corpus languages) is the
    target language."""
    if not hyps:
        return float("nan")
    ident = _identifier()
    # an empty output is in no language (langid would still name one)
    return sum(bool(h.strip()) and ident.classify(h)[0] == tgt_lang for h in hyps) / len(hyps)


def win_ratio(system: dict[str, float], baseline: dict[str, float]) -> float:
    """Share of the common directions where ``system`` scores higher than ``baseline``."""
    common = [d for d in system if d in baseline]
    if not common:
        return float("nan")
    return sum(system[d] > baseline[d] for d in common) / len(common)
