"""Drop-in masked modules, model conversion and the active-pair context."""

from .attention import MaskedMultiheadAttention
from .context import (
    MaskContext,
    active_pair,
    attach,
    get_context,
    materialized,
    set_active_pair,
)
from .convert import DEFAULT_EXCLUDE, convert, masked_parameters
from .linear import MaskedLinear, MaskedTiedLinear, masked_forward

__all__ = [
    "DEFAULT_EXCLUDE",
    "MaskContext",
    "MaskedLinear",
    "MaskedMultiheadAttention",
    "MaskedTiedLinear",
    "active_pair",
    "attach",
    "convert",
    "get_context",
    "masked_forward",
    "masked_parameters",
    "materialized",
    "set_active_pair",
]
