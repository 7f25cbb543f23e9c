"""MaskedLinear: nn.Linear whose weight is multiplied by the active pair's packed mask, fused."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.segments import remember
from .context import MaskContext, PairState


def _autocast(x: Tensor, weight: Tensor, bias: Tensor | None):
    """Custom ops are outside autocast's op lists: cast like F.linear would (floating tensors
    other than float64; autocast leaves float64 as it is)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)

        def cast(t):
            return t.to(dt) if t.is_floating_point() and t.dtype != torch.float64 else t

        x, weight = cast(x), cast(weight)
        bias = None if bias is None else cast(bias)
    return x, weight, bias


def autocast_weight_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype autocast would cast ``weight`` to for a linear of ``x`` (None: no cast). The
    masked layers then apply the mask in that cast (:func:`lass_sparse.ops.masked_cast`) and run
    the dense op on the result, as autocast runs ``F.linear`` on its cast copy: no pass over W
    beyond the cast, and the backward's masked gradient is cast back in one pass too."""
    dev = x.device.type
    if (not torch.is_autocast_enabled(dev) or not weight.is_floating_point()
            or weight.dtype == torch.float64):  # autocast leaves float64 as it is
        return None
    dt = torch.get_autocast_dtype(dev)
    return dt if weight.dtype != dt else None


def masked_dense_weight(ctx: MaskContext, st: PairState, name: str, x: Tensor, weight: Tensor,
                        bits: Tensor, rows: slice | None = None) -> Tensor | None:
    """``W ⊙ M`` for the dense op where that is the route of a single-pair call, else None (the
    fused op): inside :func:`~lass_sparse.nn.materialized` for a call without gradient, the
    block's copy (made once per layer, pair and dtype); under autocast with a weight of another
    dtype, :func:`lass_sparse.ops.masked_cast` into the autocast dtype."""
    cast = autocast_weight_dtype(x, weight)
    merged = ctx.merged
    if (merged is not None and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        dtype = cast or weight.dtype
        key = (name, st.pair, None if rows is None else rows.start, weight.device, dtype)
        stamp = (weight.data_ptr(), weight._version)  # a view shares its base's counter
        hit = merged.get(key)
        if hit is None or hit[1] != stamp:
            hit = merged[key] = (ops.masked_cast(weight, bits, dtype), stamp)
        return hit[0]
    if cast is not None:
        return ops.masked_cast(weight, bits, cast)
    return None


def _row_ids(ids: Tensor, x: Tensor, batch_dim: int) -> Tensor:
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if x.dim() > 2 and ids.numel() == lead[batch_dim]:
        view = [1] * len(lead)
        view[batch_dim] = -1
        return ids.view(view).expand(lead).reshape(-1)
    if ids.numel() == rows:
        return ids
    raise ValueError(
        f"pair_ids has {ids.numel()} entries; expected one per batch element "
        f"(x.shape[{batch_dim}]={lead[batch_dim] if lead else 0}) or one per row ({rows})"
    )


def _grouping(st: PairState, x: Tensor, batch_dim: int, ctx: MaskContext):
    """(row order or None, seg_offsets, seg_pair) of the mixed batch for activations shaped like
    ``x``; ``seg_pair`` indexes the whole bank's stack (:meth:`MaskContext.stacked`). Computed
    once per shape and shared by every masked layer until the pairs change. Built on the host
    (``pair_ids`` is usually there) and registered with the ops, so no layer, forward or
    backward, reads the table back from the device (inference mode included)."""
    key = (tuple(x.shape[:-1]), batch_dim, x.device, ctx.bank.version)  # version: the pairs
    g = st.groups.get(key)
    if g is None:
        ids = _row_ids(st.pair_ids.cpu(), x, batch_dim)
        order = None
        if ids.numel() > 1 and not bool((ids[1:] >= ids[:-1]).all()):
            order = torch.argsort(ids, stable=True)
            ids = ids[order]
        counts = torch.bincount(ids, minlength=len(st.pairs)).tolist()
        rows = ctx.bank.pair_index(st.pairs)
        present = [i for i, c in enumerate(counts) if c]
        offs = [0, *itertools.accumulate(counts[i] for i in present)]
        pairs = [rows[i] for i in present]
        offsets, seg_pair = (torch.tensor(v, dtype=torch.long).to(x.device, non_blocking=True)
                             for v in (offs, pairs))
        remember(offsets, seg_pair, offs, pairs)
        g = st.groups[key] = (None if order is None else order.to(x.device, non_blocking=True),
                             offsets, seg_pair)
    return g


def _grouping_traced(st: PairState, x: Tensor, batch_dim: int, ctx: MaskContext):
    """:func:`_grouping` under ``torch.compile``: the same table from tensor ops of static shape
    (one segment per pair of ``st.pairs``, empty ones included; rows always reordered), no host
    reads and no cache, so one graph serves every batch composition."""
    ids = _row_ids(st.pair_ids.to(x.device, non_blocking=True), x, batch_dim)
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(len(st.pairs), dtype=torch.long, device=x.device).index_add_(
        0, ids, torch.ones_like(ids))
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    seg_pair = torch.tensor(ctx.bank.pair_index(st.pairs), dtype=torch.long, device=x.device)
    return order, offsets, seg_pair


def masked_forward(
    ctx: MaskContext | None,
    name: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: slice | None = None,
    batch_dim: int | None = None,
    state: PairState | None = None,
) -> Tensor:
    """``F.linear(x, weight ⊙ M, bias)`` with M the active pair's mask of parameter ``name``
    (``rows`` selects a row block of it, for a packed in_proj). Dense when no pair is active.
    ``state``: the setting to use (default: the calling thread's, read once)."""
    st = None if ctx is None else (state or ctx.current())
    if st is None or not st.active:
        return F.linear(x, weight, bias)
    if st.pair_ids is None:
        bits = ctx.bits(name, x.device, st)
        if bits is None:
            return F.linear(x, weight, bias)
        bits = bits if rows is None else bits[rows]
        wm = masked_dense_weight(ctx, st, name, x, weight, bits, rows)
        if wm is not None:  # F.linear casts x and bias as autocast does
            return F.linear(x, wm, bias)
        x, weight, bias = _autocast(x, weight, bias)
        return ops.masked_linear(x, weight, bits, bias)
    x, weight, bias = _autocast(x, weight, bias)
    bank_bits = ctx.stacked(name, x.device)
    if bank_bits is None:
        return F.linear(x, weight, bias)
    if rows is not None:
        bank_bits = bank_bits[:, rows]
    group = _grouping_traced if torch.compiler.is_compiling() else _grouping
    order, offsets, seg_pair = group(st, x, st.batch_dim if batch_dim is None else batch_dim, ctx)
    x2 = x.reshape(-1, x.shape[-1])
    if order is not None:
        x2 = x2[order]
    y = ops.segmented_masked_linear(x2, weight, bank_bits, offsets, seg_pair, bias)
    if order is not None:
        y = torch.empty_like(y).index_copy(0, order, y)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _MaskedWeight:
    """The masked forward of a module with one maskable ``weight`` (and an optional bias)."""

    _lass_ctx: MaskContext | None = None
    _lass_prefix: str = ""

    def _lass_param_names(self) -> list[str]:
        return ["weight"]

    def forward(self, input: Tensor) -> Tensor:
        return masked_forward(self._lass_ctx, self._lass_prefix + "weight", input, self.weight,
                              self.bias)


class MaskedLinear(_MaskedWeight, nn.Linear):
    """Drop-in ``nn.Linear``: same constructor, parameters and state_dict keys. With a MaskBank
    attached (:func:`lass_sparse.attach`) and a pair active, computes ``x @ (W ⊙ M_pair)ᵀ + b``
    with the packed mask fused into the kernel (masked dW in backward); otherwise exactly
    ``nn.Linear``."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> MaskedLinear:
        """A MaskedLinear sharing ``linear``'s weight and bias parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device="meta")
        m.weight = linear.weight
        m.bias = linear.bias
        m.train(linear.training)
        return m

    def extra_repr(self) -> str:
        return super().extra_repr() + ", masked=True"


class MaskedTiedLinear(_MaskedWeight, nn.Module):
    """Output projection tied to an embedding matrix: ``x @ (E ⊙ M_pair)ᵀ (+ bias)``, dense
    ``x @ Eᵀ`` when no pair is active.

    This is the released LaSS code's masked ``decoder.output_projection`` with shared embeddings:
    the lookup keeps using ``E`` unmasked, the vocabulary projection uses ``E ⊙ M``. The embedding
    is referenced, not registered, so the model's parameters and state_dict keys do not change;
    :attr:`weight` is the embedding's Parameter (the bank keys its mask as ``<name>.weight``).
    Off-mask entries of ``E`` get gradient from the lookup only; :class:`~lass_sparse.optim.
    MaskedAdamW` updates the whole matrix, since the lookup uses it unmasked.
    """

    def __init__(self, embedding: nn.Embedding, bias: Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"MaskedTiedLinear: expected nn.Embedding, got "
                            f"{type(embedding).__name__}")
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: no duplicate keys
        self.bias = bias

    @property
    def weight(self) -> nn.Parameter:
        return self._embedding.weight

    @property
    def in_features(self) -> int:
        return self._embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self._embedding.num_embeddings

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tied=True, masked=True")
