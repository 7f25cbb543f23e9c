"""convert(model): swap nn.Linear / nn.MultiheadAttention for their masked twins, in place."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from ..masks import MaskBank
from .attention import MaskedMultiheadAttention
from .context import attach, masked_modules
from .linear import MaskedLinear

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


def masked_parameters(model: nn.Module, include: Patterns = None,
                      exclude: Patterns = None, *,
                      mask_tied_output: bool = False) -> dict[str, int]:
    """``{parameter name -> q/k/v chunks}`` a LaSS mask covers: those of a converted model's masked
    modules, or (unconverted model) those :func:`convert` would mask. ``in_proj_weight`` has 3
    chunks (q, k and v are pruned as separate tensors); an attention with ``kdim``/``vdim !=
    embed_dim`` has ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight``, one chunk each."""
    out: dict[str, int] = {}
    mods = list(masked_modules(model)) or list(_selected(model, include, exclude,
                                                           mask_tied_output))
    for name, m in mods:
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention):
            if m._qkv_same_embed_dim:
                out[prefix + "in_proj_weight"] = 3
            else:  # kdim / vdim != embed_dim: separate q, k, v weights, one mask each
                for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    out[prefix + n] = 1
            out[prefix + "out_proj.weight"] = 1
        else:
            out[prefix + "weight"] = 1
    return out


def convert(
    model: nn.Module,
    include: Patterns = None,
    exclude: Patterns = None,
    bank: MaskBank | None = None,
    *,
    mask_tied_output: bool = False,
) -> list[str]:
    """Replace, in place, the ``nn.Linear`` and ``nn.MultiheadAttention`` modules of ``model`` by
    :class:`MaskedLinear` / :class:`MaskedMultiheadAttention` sharing their parameters (state_dict
    keys unchanged). Returns the masked parameter names: exactly those of the model's masked
    modules (every ``nn.MultiheadAttention`` configuration is converted).

    ``include`` / ``exclude``: glob patterns over module names (or a predicate). By default every
    linear layer is masked except embeddings, norms, and the output projection (modules named like
    ``lm_head``, ``output_projection``, ``generator``, or whose weight is tied to an embedding) —
    as in LaSS's paper. ``mask_tied_output=True`` masks a head tied to an embedding too (what the
    released LaSS code ran: the vocabulary projection uses ``E ⊙ M`` while the lookup uses ``E``);
    its mask gets the head's own name (e.g. ``lm_head.weight``) and :class:`MaskedAdamW` keeps the
    shared matrix fully trainable. ``bank``: attach it right away (see
    :func:`lass_sparse.attach`).
    """
    if isinstance(model, (nn.Linear, nn.MultiheadAttention)) and not isinstance(
        model, (MaskedLinear, MaskedMultiheadAttention)
    ):
        raise ValueError("convert: the model itself is a layer; use MaskedLinear.from_linear / "
                         "MaskedMultiheadAttention.from_mha")
    for name, m in list(_selected(model, include, exclude, mask_tied_output)):
        if isinstance(m, (MaskedLinear, MaskedMultiheadAttention)):
            continue
        if isinstance(m, nn.MultiheadAttention):
            new: nn.Module = MaskedMultiheadAttention.from_mha(m)
        else:
            new = MaskedLinear.from_linear(m)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    for m in model.modules():
        # nn.TransformerEncoderLayer's inference fast path reads in_proj_weight directly, which
        # would skip the masks; this attribute only gates that path.
        if isinstance(m, nn.TransformerEncoderLayer) and isinstance(
            m.self_attn, MaskedMultiheadAttention
        ):
            m.activation_relu_or_gelu = 0
    if bank is not None:
        attach(model, bank)
    return list(masked_parameters(model))
