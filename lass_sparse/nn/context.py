"""Which pair's masks a model's masked modules use: one shared MaskContext per model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..masks import MaskBank


class MaskContext:
    """Shared by every masked module of a model: the bank, the active pair (or per-row pair ids
    for a mixed batch), and device copies of the bits. Plain Python state: deepcopy and pickle
    carry it."""

    def __init__(self, bank: MaskBank) -> None:
        self.bank = bank
        self.pair: str | None = None  # single-pair mode
        self.pairs: tuple[str, ...] | None = None  # mixed mode: pair_ids index into this
        self.pair_ids: Tensor | None = None
        self.batch_dim = 0
        self._names = frozenset(bank.names)
        self._cache: dict[tuple, Tensor] = {}
        self._groups: dict[tuple, tuple] = {}  # mixed batch: row grouping per activation shape
        self._version = bank.version

    @property
    def active(self) -> bool:
        return self.pair is not None or self.pair_ids is not None

    def _fresh(self) -> None:
        if self._version != self.bank.version:
            self._cache.clear()
            self._names = frozenset(self.bank.names)
            self._version = self.bank.version

    def _device_copy(self, key: tuple, fetch) -> Tensor | None:
        self._fresh()
        if key[1] not in self._names:
            return None
        b = self._cache.get(key)
        if b is None:
            b = self._cache[key] = fetch().to(key[2])
        return b

    def bits(self, name: str, device: torch.device) -> Tensor | None:
        """The active pair's bits for parameter ``name`` on ``device`` (None: not masked)."""
        return self._device_copy((self.pair, name, device),
                                 lambda: self.bank.bits(self.pair, name))

    def stacked(self, name: str, device: torch.device) -> Tensor | None:
        """``int32[P, rows, W]`` bits of the mixed batch's pairs for ``name`` (None: not masked)."""
        return self._device_copy((self.pairs, name, device),
                                 lambda: self.bank.stack(self.pairs)[name])

    def set(self, pair=None, pair_ids=None, batch_dim: int = 0) -> None:
        self._fresh()
        self._groups = {}
        if pair_ids is not None:
            pairs = (pair,) if isinstance(pair, str) else tuple(pair or ())
            if not pairs:
                raise ValueError("set_active_pair: pair_ids needs pair=[names] that the ids index")
            for p in pairs:
                self.bank._check_pair(p)  # KeyError listing the known pairs
            if not isinstance(pair_ids, Tensor) or pair_ids.dim() != 1 or pair_ids.dtype not in (
                torch.int32, torch.int64
            ):
                raise TypeError("set_active_pair: pair_ids must be a 1-D integer tensor")
            if pair_ids.numel() and not 0 <= int(pair_ids.min()) <= int(pair_ids.max()) < len(
                pairs
            ):
                raise ValueError(f"set_active_pair: pair_ids must be in [0, {len(pairs)})")
            self.pair, self.pairs, self.pair_ids = None, pairs, pair_ids.long()
        else:
            if pair is not None:
                if not isinstance(pair, str):
                    raise TypeError(f"set_active_pair: pair must be a str or None, got {pair!r}")
                self.bank._check_pair(pair)
            self.pair, self.pairs, self.pair_ids = pair, None, None
        self.batch_dim = batch_dim

    def state(self):
        return (self.pair, self.pairs, self.pair_ids, self.batch_dim)

    def restore(self, state) -> None:
        self.pair, self.pairs, self.pair_ids, self.batch_dim = state
        self._groups = {}


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every masked module (MaskedLinear, MaskedTiedLinear, masked MHA)."""
    for name, m in model.named_modules():
        if hasattr(m, "_lass_param_names"):
            yield name, m


def get_context(model: nn.Module) -> MaskContext:
    ctx = getattr(model, "_lass_ctx", None)
    if ctx is None:
        for _, m in masked_modules(model):
            ctx = m._lass_ctx
            if ctx is not None:
                break
    if ctx is None:
        raise RuntimeError(
            "no MaskBank attached to this model: call lass_sparse.attach(model, bank) (after "
            "lass_sparse.convert(model))"
        )
    return ctx


def attach(model: nn.Module, bank: MaskBank) -> MaskContext:
    """Attach ``bank`` to every masked module of ``model`` (a converted model or a masked module).

    Every bank parameter must be a masked parameter of ``model`` with the same shape; masked
    modules whose weights the bank does not cover run dense. Returns the shared context.
    """
    if not isinstance(bank, MaskBank):
        raise TypeError(f"attach: bank must be a MaskBank, got {type(bank).__name__}")
    mods = list(masked_modules(model))
    if not mods:
        raise ValueError("attach: model has no masked modules; call lass_sparse.convert(model)")
    covered: dict[str, tuple[int, ...]] = {}
    for name, m in mods:
        prefix = f"{name}." if name else ""
        for pname in m._lass_param_names():
            covered[prefix + pname] = tuple(m.get_parameter(pname).shape)
    for pname, shape in bank.shapes.items():
        if pname not in covered:
            raise ValueError(
                f"attach: the bank masks parameter {pname!r}, which is not a masked parameter of "
                f"the model (masked: {sorted(covered)[:6]}...)"
            )
        if covered[pname] != shape:
            raise ValueError(
                f"attach: the bank's mask for {pname!r} is for shape {list(shape)}, the model's "
                f"parameter is {list(covered[pname])}"
            )
    ctx = MaskContext(bank)
    for name, m in mods:
        m._lass_ctx = ctx
        m._lass_prefix = f"{name}." if name else ""
    object.__setattr__(model, "_lass_ctx", ctx)
    return ctx


def set_active_pair(
    model: nn.Module,
    pair: str | Sequence[str] | None,
    *,
    pair_ids: Tensor | None = None,
    batch_dim: int = 0,
) -> None:
    """Make ``model``'s masked modules use ``pair``'s masks (None: dense, exactly ``nn.Linear``).

    Mixed-pair batches: ``pair=[names]`` and ``pair_ids`` (LongTensor) indexing them, one id per
    batch element (along ``batch_dim`` of the activations) or per row; rows are grouped by pair and
    run by the segmented kernel.
    """
    get_context(model).set(pair, pair_ids, batch_dim)


@contextlib.contextmanager
def active_pair(
    model: nn.Module,
    pair: str | Sequence[str] | None,
    *,
    pair_ids: Tensor | None = None,
    batch_dim: int = 0,
):
    """``with active_pair(model, "en-de"):`` — :func:`set_active_pair` for the block only."""
    ctx = get_context(model)
    saved = ctx.state()
    ctx.set(pair, pair_ids, batch_dim)
    try:
        yield ctx
    finally:
        ctx.restore(saved)
