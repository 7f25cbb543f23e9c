"""Which parameters a LaSS mask covers, and the magnitude rule that makes the masks.

Torch-level only (depends on :mod:`lass_sparse.ops`): masked modules are recognised by protocol
(a ``_lass_param_names`` method), not by importing :mod:`lass_sparse.nn`, so that
:mod:`lass_sparse.masks` and :mod:`lass_sparse.nn` can both build on this module.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .ops import magnitude_mask

# LaSS masks every weight matrix except embeddings, norms and the output (vocabulary) projection.
DEFAULT_EXCLUDE = ("*lm_head*", "*output_projection*", "*generator*", "*final_logits*",
                   "*embed*")

Patterns = Iterable[str] | Callable[[str], bool] | None


def _matcher(patterns: Patterns) -> Callable[[str], bool] | None:
    if patterns is None:
        return None
    if callable(patterns):
        return patterns
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in pats)


def _selected(
    model: nn.Module, include: Patterns, exclude: Patterns, mask_tied_output: bool = False
) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every Linear / MHA that convert() would mask, outermost first.
    ``mask_tied_output``: also Linears whose weight is an embedding's (tied output heads); the
    default name exclusions do not apply to them, an explicit ``exclude`` does."""
    inc = _matcher(include)
    exc = _matcher(DEFAULT_EXCLUDE if exclude is None else exclude)
    user_exc = _matcher(exclude)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    inside_mha: set[str] = set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_mha):
            continue  # an MHA's out_proj goes with its MHA
        is_tied = isinstance(m, nn.Linear) and id(m.weight) in tied
        if isinstance(m, nn.MultiheadAttention):
            inside_mha.add(name)
        elif not isinstance(m, nn.Linear) or (is_tied and not mask_tied_output):
            continue
        if inc is not None and not inc(name):
            continue
        if (user_exc if is_tied else exc) is not None and (user_exc if is_tied else exc)(name):
            continue
        yield name, m


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every masked module (MaskedLinear, MaskedTiedLinear, masked MHA)."""
    for name, m in model.named_modules():
        if hasattr(m, "_lass_param_names"):
            yield name, m


def masked_parameters(model: nn.Module, include: Patterns = None,
                      exclude: Patterns = None, *,
                      mask_tied_output: bool = False) -> dict[str, int]:
    """``{parameter name -> q/k/v chunks}`` a LaSS mask covers: those of a converted model's masked
    modules, or (unconverted model) those :func:`lass_sparse.convert` would mask.
    ``in_proj_weight`` has 3 chunks (q, k and v are pruned as separate tensors); an attention with
    ``kdim``/``vdim != embed_dim`` has ``q_proj_weight``, ``k_proj_weight`` and
    ``v_proj_weight``, one chunk each."""
    out: dict[str, int] = {}
    mods = list(masked_modules(model)) or list(_selected(model, include, exclude,
                                                           mask_tied_output))
    for name, m in mods:
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention):  # MaskedMultiheadAttention subclasses it
            if m._qkv_same_embed_dim:
                out[prefix + "in_proj_weight"] = 3
            else:  # kdim / vdim != embed_dim: separate q, k, v weights, one mask each
                for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    out[prefix + n] = 1
            out[prefix + "out_proj.weight"] = 1
        else:
            out[prefix + "weight"] = 1
    return out


def magnitude_chunks(weight: Tensor, alpha: float, chunks: int = 1) -> Tensor:
    """The LaSS rule per tensor; ``chunks > 1`` splits the rows into equal parts pruned separately
    (a packed ``in_proj_weight`` holds q, k and v, which LaSS prunes as three tensors)."""
    if chunks == 1:
        return magnitude_mask(weight, alpha)
    if weight.shape[0] % chunks:
        raise ValueError(f"magnitude_chunks: {weight.shape[0]} rows do not split into {chunks}")
    return torch.cat([magnitude_mask(w, alpha) for w in weight.chunk(chunks, 0)])


def chunks_of(
    model: nn.Module, names: Iterable[str] | Mapping[str, int] | None = None
) -> dict[str, int]:
    """``{name -> chunks}``: :func:`masked_parameters` of ``model`` when ``names`` is None, the
    mapping itself, or (plain names) 3 chunks for an ``in_proj_weight``, else 1."""
    if names is None:
        return masked_parameters(model)
    if isinstance(names, Mapping):
        return {n: int(c) for n, c in names.items()}
    return {n: 3 if n.endswith("in_proj_weight") else 1 for n in names}


def magnitude_masks(
    model: nn.Module, shapes: Mapping[str, tuple[int, ...]], alpha: float,
    chunks: Mapping[str, int],
) -> dict[str, Tensor]:
    """Magnitude masks (bool) of ``model``'s parameters named by ``shapes``, each checked against
    its expected shape; ``chunks``: q/k/v chunks per name (missing: 1)."""
    out = {}
    for n, shape in shapes.items():
        try:  # get_parameter also finds aliases (a tied output head's weight)
            p = model.get_parameter(n)
        except AttributeError:
            raise KeyError(f"masks_from_model: model has no parameter {n!r}") from None
        if tuple(p.shape) != shape:
            raise ValueError(f"masks_from_model: parameter {n!r} is {list(p.shape)}, the "
                             f"bank expects {list(shape)}")
        out[n] = magnitude_chunks(p.detach(), alpha, chunks.get(n, 1))
    return out


__all__ = ["DEFAULT_EXCLUDE", "Patterns", "chunks_of", "magnitude_chunks", "magnitude_masks",
           "masked_modules", "masked_parameters"]
