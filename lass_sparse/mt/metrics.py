"""BLEU / chrF (sacrebleu, with signatures), translation accuracy (langid), win ratio, paired
and pooled bootstrap significance against a baseline system (sacrebleu's ``--paired-bs``).

The one place where translations are scored: the pipeline (:mod:`lass_sparse.lass.pipeline`)
and the Hugging Face stages (:mod:`lass_sparse.hf.pipeline`) both report through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

from .corpus import LANGS
from .direction import Direction


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


def score_translations(hyps: list[str], refs: list[str], tgt_lang: str) -> dict:
    """Every metric of one system on one direction: :func:`bleu_chrf` (``bleu``, ``chrf`` and
    their signatures), ``acc`` (:func:`translation_accuracy`) and ``n`` (rows)."""
    return {**bleu_chrf(hyps, refs, tgt_lang), "acc": translation_accuracy(hyps, tgt_lang),
            "n": len(hyps)}


def win_ratio(system: dict[str, float], baseline: dict[str, float]) -> float:
    """Share of the common directions where ``system`` scores higher than ``baseline``."""
    common = [d for d in system if d in baseline]
    if not common:
        return float("nan")
    return sum(system[d] > baseline[d] for d in common) / len(common)


# --- paired bootstrap resampling (sacrebleu's ``--paired-bs``, on sufficient statistics) -------
#
# What sacrebleu.significance._paired_bs_test computes, which this reproduces exactly: one index
# matrix ``numpy.random.default_rng(seed).choice(n, size=(n_samples, n))`` shared by both
# systems and all metrics; each resample's score comes from the summed per-sentence statistics
# (float32, as sacrebleu sums them); the test statistic is the absolute score difference;
# p = (1 + #{i : |d_i| - mean|d| > |d_obs|}) / (n_samples + 1), a two-sided test of "no
# difference" (the sign of ``delta`` tells which system is better); the reported system CI is
# the sorted resampled scores at indices n_samples // 40 and n_samples - n_samples // 40 - 1.


def _metrics(tgt_lang: str, refs: list[str]) -> dict:
    """The metrics of ``bleu_chrf`` with the references pre-cached."""
    from sacrebleu.metrics import BLEU, CHRF

    return {"bleu": BLEU(tokenize="zh" if tgt_lang == "zh" else "13a", references=[refs]),
            "chrf": CHRF(references=[refs])}


def _check_rows(baseline_hyps, system_hyps, refs, where: str = "") -> int:
    n = len(refs)
    if n == 0:
        raise ValueError(f"refs{where} is empty")
    for name, hyps in (("baseline_hyps", baseline_hyps), ("system_hyps", system_hyps)):
        if len(hyps) != n:
            raise ValueError(f"{name}{where} has {len(hyps)} lines but refs has {n}")
    return n


def _check_samples(n_samples: int) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples <= 0:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")


def _resample_direction(baseline_hyps, system_hyps, refs, tgt_lang, idxs) -> dict:
    """Per metric: full-corpus (baseline, system) scores and the resampled score arrays."""
    import numpy as np

    n = len(refs)
    s = idxs.shape[0]
    # counts[i, j] = how often sentence j is drawn in resample i; sums = counts @ stats
    counts = np.bincount((idxs + n * np.arange(s)[:, None]).ravel(), minlength=s * n)
    counts = counts.reshape(s, n).astype(np.float64)
    out = {}
    for key, metric in _metrics(tgt_lang, refs).items():
        full, samples = [], []
        for hyps in (baseline_hyps, system_hyps):
            stats = metric._extract_corpus_statistics(hyps, None)
            full.append(float(metric._aggregate_and_compute(stats).score))
            # integer sums, exact in float64; float32 like sacrebleu's float32 sums
            sums = (counts @ np.asarray(stats, dtype=np.float64)).astype(np.float32)
            # no dtype: chrF scores come out float32, as in sacrebleu (and so do their means)
            samples.append(np.array([metric._compute_score_from_stats(r).score for r in sums]))
        out[key] = (full, samples)
    return out


def _ci(scores) -> tuple[float, float, list[float]]:
    """sacrebleu's ``estimate_ci``: mean, half-width and [lo, hi] of the middle 95%."""
    import numpy as np

    srt = np.sort(scores)
    lo_i = len(srt) // 40
    lo, hi = float(srt[lo_i]), float(srt[len(srt) - lo_i - 1])
    return float(srt.mean()), 0.5 * (hi - lo), [lo, hi]


def _summary(baseline: float, system: float, bl_samples, sys_samples) -> dict:
    import numpy as np

    observed = abs(baseline - system)
    sample_diffs = np.abs(sys_samples - bl_samples)
    if observed == 0 and not sample_diffs.any():
        p = 1.0  # indistinguishable in every resample (sacrebleu would say 1 / (n_samples + 1))
    else:
        c = int(np.sum(sample_diffs - sample_diffs.mean() > observed))
        p = (c + 1) / (len(sample_diffs) + 1)
    sys_mean, sys_ci, ci95 = _ci(sys_samples)
    bl_mean, bl_ci, _ = _ci(bl_samples)
    _, _, delta_ci95 = _ci(sys_samples - bl_samples)
    return {"baseline": baseline, "system": system, "delta": system - baseline, "p_value": p,
            "system_mean": sys_mean, "system_ci": sys_ci, "ci95": ci95,
            "baseline_mean": bl_mean, "baseline_ci": bl_ci, "delta_ci95": delta_ci95}


def paired_bootstrap(baseline_hyps: list[str], system_hyps: list[str], refs: list[str],
                     tgt_lang: str, *, n_samples: int = 1000, seed: int | None = 12345) -> dict:
    """Paired bootstrap test of ``system_hyps`` against ``baseline_hyps`` on corpus BLEU and chrF
    (tokenizer as in :func:`bleu_chrf`), identical to sacrebleu's paired bootstrap
    (``PairedTest(..., test_type="bs")`` with ``SACREBLEU_SEED=seed``; sacrebleu treats seed 0 as
    unseeded). Per metric: full-corpus ``baseline``/``system`` scores, ``delta`` = system -
    baseline, two-sided ``p_value`` = (1 + #{resamples whose centred |difference| exceeds the
    observed |difference|}) / (n_samples + 1), ``system_mean`` ± ``system_ci`` (sacrebleu's
    μ ± half-width), ``ci95`` = [lo, hi] of the resampled *system score*, ``delta_ci95`` =
    [lo, hi] of the resampled *delta*, ``baseline_mean``/``baseline_ci``. Deviation: when every
    resample gives both systems the same score (e.g. identical outputs) p is 1.0, not sacrebleu's
    1 / (n_samples + 1)."""
    import numpy as np

    n = _check_rows(baseline_hyps, system_hyps, refs)
    _check_samples(n_samples)
    idxs = np.random.default_rng(seed).choice(n, size=(n_samples, n), replace=True)
    res = _resample_direction(baseline_hyps, system_hyps, refs, tgt_lang, idxs)
    out: dict = {k: _summary(full[0], full[1], smp[0], smp[1]) for k, (full, smp) in res.items()}
    out.update(n=n, n_samples=n_samples, seed=seed)
    return out


def pooled_bootstrap(per_direction: dict[str, tuple[list[str], list[str], list[str], str]], *,
                     n_samples: int = 1000, seed: int | None = 12345) -> dict:
    """The paired bootstrap test of :func:`paired_bootstrap` on the *average over directions* of
    corpus BLEU (and chrF). ``per_direction``: direction -> (baseline_hyps, system_hyps, refs,
    tgt_lang). In each resample the rows of every direction are drawn independently (one RNG,
    directions in sorted order, each ``rng.choice(n_d, size=(n_samples, n_d))``), the per-direction
    scores are averaged, and the statistic, p-value and intervals are those of
    :func:`paired_bootstrap` on the averages (the same numbers as it for a single direction).
    ``baseline``/``system`` are the averages of the full-corpus scores."""
    import numpy as np

    if not per_direction:
        raise ValueError("per_direction is empty")
    _check_samples(n_samples)
    rows = {}
    for d, entry in per_direction.items():
        if len(entry) != 4:
            raise ValueError(f"per_direction[{d!r}] must be (baseline_hyps, system_hyps, refs, "
                             f"tgt_lang), got {len(entry)} items")
        rows[d] = _check_rows(*entry[:3], where=f" of per_direction[{d!r}]")
    rng = np.random.default_rng(seed)
    acc: dict[str, list] = {}
    for d in sorted(per_direction):
        idxs = rng.choice(rows[d], size=(n_samples, rows[d]), replace=True)
        for k, v in _resample_direction(*per_direction[d], idxs).items():
            acc.setdefault(k, []).append(v)
    out: dict = {}
    for k, per_d in acc.items():
        full_bl = sum(full[0] for full, _ in per_d) / len(per_d)
        full_sys = sum(full[1] for full, _ in per_d) / len(per_d)
        bl = np.mean([smp[0] for _, smp in per_d], axis=0)
        sy = np.mean([smp[1] for _, smp in per_d], axis=0)
        out[k] = _summary(full_bl, full_sys, bl, sy)
    out.update(directions=dict(sorted(rows.items())), n=sum(rows.values()), n_samples=n_samples,
               seed=seed)
    return out


def significance(hyps: Mapping[str, Mapping[str, tuple[list[str], list[str]]]], baseline: str,
                 directions: Sequence[str], *, n_samples: int = 1000,
                 seed: int | None = 12345) -> dict:
    """Paired bootstrap of every system against ``baseline`` on the same rows, per direction
    (:func:`paired_bootstrap`) and pooled over ``directions`` (:func:`pooled_bootstrap`, average
    BLEU/chrF). ``hyps``: ``{system: {direction: (hypotheses, references)}}``. Returns
    ``{system: {"directions": {direction: test}, "pooled": test}}`` for each other system."""
    if baseline not in hyps:
        raise KeyError(f"significance: no hypotheses of baseline {baseline!r} "
                       f"(systems: {sorted(hyps)})")
    out = {}
    for name, by_dir in hyps.items():
        if name == baseline:
            continue
        per, pooled_in = {}, {}
        for d in directions:
            base_h, refs = hyps[baseline][d]
            sys_h, _ = by_dir[d]
            tgt = Direction.parse(d).tgt
            per[d] = paired_bootstrap(base_h, sys_h, refs, tgt, n_samples=n_samples, seed=seed)
            pooled_in[d] = (base_h, sys_h, refs, tgt)
        out[name] = {"directions": per,
                     "pooled": pooled_bootstrap(pooled_in, n_samples=n_samples, seed=seed)}
    return out
