"""Markdown tables of evaluation results: BLEU / chrF / ACC per direction and system with
averages and win ratios, and the paired bootstrap against a baseline. The shapes are those of
:func:`lass_sparse.mt.metrics.score_translations` (per system and direction) and
:func:`lass_sparse.mt.metrics.significance`."""

from __future__ import annotations

from .metrics import win_ratio


def render_significance(sig: dict, baseline: str) -> str:
    """Markdown: per system, BLEU delta and p-value against the baseline, per direction and
    pooled."""
    lines = []
    for name, s in sig.items():
        lines += [f"Paired bootstrap, {name} vs {baseline} (BLEU; p: sacrebleu's paired "
                  "bootstrap p-value):", "", "| direction | Δ BLEU | p |", "|---|---|---|"]
        for d, t in s["directions"].items():
            lines.append(f"| {d} | {t['bleu']['delta']:+.2f} | {t['bleu']['p_value']:.4f} |")
        p = s["pooled"]["bleu"]
        lines += [f"| **pooled (average)** | {p['delta']:+.2f} | {p['p_value']:.4f} |", ""]
    return "\n".join(lines)


def render_table(results: dict, directions: list[str], baseline: str | None = None) -> str:
    """Markdown: one row per direction, BLEU / chrF / ACC per system, averages, win ratios."""
    systems = list(results)
    head = ["direction"] + [f"{s} {m}" for s in systems for m in ("BLEU", "chrF", "ACC")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in directions:
        cells = [d]
        for s in systems:
            r = results[s][d]
            cells += [f"{r['bleu']:.1f}", f"{r['chrf']:.1f}", f"{r['acc']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    avg = ["**average**"]
    for s in systems:
        for m in ("bleu", "chrf", "acc"):
            v = sum(results[s][d][m] for d in directions) / len(directions)
            avg.append(f"{v:.2f}" if m == "acc" else f"{v:.1f}")
    lines.append("| " + " | ".join(avg) + " |")
    if baseline and baseline in results:
        lines.append("")
        base = {d: results[baseline][d]["bleu"] for d in directions}
        for s in systems:
            if s != baseline:
                w = win_ratio({d: results[s][d]["bleu"] for d in directions}, base)
                lines.append(f"- win ratio of {s} over {baseline} (BLEU): {w:.0%}")
    return "\n".join(lines)
