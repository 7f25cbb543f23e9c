"""Figures: mask similarity heatmap (LaSS Fig. 4), per-layer similarity (Fig. 5/6) and the
extension curves (Fig. 3)."""

from __future__ import annotations

import io

from ..fileio import atomic_write
from ..masks import MaskBank


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out_png: str) -> str:
    """Render ``fig`` to PNG in memory and write it atomically (a crash never leaves half a
    PNG); closes the figure."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=130)
    finally:
        plt.close(fig)
    atomic_write(out_png, buf.getvalue())
    return out_png


def similarity_matrix(bank: MaskBank, pairs: list[str]) -> list[list[float]]:
    return [[bank.similarity(a, b) for b in pairs] for a in pairs]


def color_range(m: list[list[float]]) -> tuple[float, float]:
    """Colour limits over the off-diagonal values (the diagonal is 1 by definition and would
    flatten every other cell into one colour)."""
    off = [v for i, row in enumerate(m) for j, v in enumerate(row) if i != j]
    if not off:
        return 0.0, 1.0
    lo, hi = min(off), max(off)
    return (lo, hi) if hi > lo else (lo - 1e-3, hi + 1e-3)


def similarity_heatmap(bank: MaskBank, pairs: list[str], out_png: str,
                       title: str = "mask similarity |M1 ∩ M2| / |M1|") -> str:
    plt = _plt()
    m = similarity_matrix(bank, pairs)
    lo, hi = color_range(m)
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(pairs), 0.8 + 0.45 * len(pairs)))
    im = ax.imshow(m, cmap="viridis", vmin=lo, vmax=hi)  # the diagonal's 1.0 saturates
    ax.set_xticks(range(len(pairs)), pairs, rotation=90)
    ax.set_yticks(range(len(pairs)), pairs)
    for i in range(len(pairs)):
        for j in range(len(pairs)):
            ax.text(j, i, f"{m[i][j]:.3f}", ha="center", va="center", fontsize=6,
                    color="white" if m[i][j] < (lo + hi) / 2 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(plt, fig, out_png)


def layer_similarity_plot(bank: MaskBank, pairs: list[tuple[str, str]], out_png: str) -> str:
    """Similarity per layer for some pairs of directions (one line each)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for a, b in pairs:
        s = bank.similarity(a, b, by="layer")
        ax.plot(list(s), list(s.values()), marker="o", label=f"{a} vs {b}")
    ax.set_ylabel("similarity")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, out_png)


def extension_plot(curves: dict[str, list[dict]], out_png: str) -> str:
    """Fig. 3 analogue: new-pair BLEU and the other directions' BLEU against extension steps,
    one line per system (``curves``: system -> [{step, new_bleu, others_bleu}, ...])."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for label, pts in curves.items():
        xs = [p["step"] for p in pts]
        axes[0].plot(xs, [p["new_bleu"] for p in pts], marker="o", label=label)
        axes[1].plot(xs, [p["others_bleu"] for p in pts], marker="o", label=label)
    for ax, title in zip(axes, ("new pair: average BLEU", "other directions: average BLEU")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("extension steps")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, out_png)
