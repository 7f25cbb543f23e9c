"""convert(model): swap nn.Linear / nn.MultiheadAttention for their masked twins, in place.

Which modules are masked (``DEFAULT_EXCLUDE``, :func:`masked_parameters`) lives in
:mod:`lass_sparse.pruning`; the names are re-exported here."""

from __future__ import annotations

from torch import nn

from ..masks import MaskBank
from ..pruning import DEFAULT_EXCLUDE, Patterns, _selected, masked_parameters  # noqa: F401
from .attention import MaskedMultiheadAttention
from .context import attach
from .linear import MaskedLinear


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
