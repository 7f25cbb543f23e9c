"""Which pair's masks a model's masked modules use: one shared MaskContext per model, with the
active pair kept per thread."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..masks import MaskBank
from ..pruning import masked_modules


class PairState:
    """One active-pair setting: a single pair, or a mixed batch (``pairs`` indexed by
    ``pair_ids``). ``groups`` caches the mixed batch's row grouping per activation shape."""

    def __init__(self, pair: str | None = None, pairs: tuple[str, ...] | None = None,
                 pair_ids: Tensor | None = None, batch_dim: int = 0) -> None:
        self.pair = pair
        self.pairs = pairs
        self.pair_ids = pair_ids
        self.batch_dim = batch_dim
        self.groups: dict[tuple, tuple] = {}
        # a plain bool, not derived from ``pair`` in the forward: torch.compile then guards on
        # it, not on the pair's name (one graph for every pair)
        self.active = pair is not None or pair_ids is not None


_DENSE = PairState()


class MaskContext:
    """Shared by every masked module of a model: the bank, device copies of the bits, and the
    active pair, **per thread**: ``with active_pair(model, p)`` in one thread does not change
    what another thread's forward uses, so threads may run one model with different pairs
    concurrently.

    A thread that never set a pair (a helper thread: DataParallel replicas, the autograd engine's
    device threads that recompute checkpointed activations) sees the setting most recently made
    by a live thread that still holds one, else :func:`set_active_pair`'s. Plain Python state
    otherwise: deepcopy and pickle carry the calling thread's setting.

    Under ``torch.compile`` a single-pair forward reads *static* bits: one buffer per masked
    parameter and device, refilled in place (one ``_foreach_copy_`` per device) whenever a
    single pair is set, so the compiled graph takes the bits as an input that never changes
    identity — one graph serves every pair (else the pair's name is guarded and every pair
    compiles twice). The buffers exist from the first compiled forward on (that one, and the one
    after, compile), for the devices it ran on; eager-only use never makes them. While threads
    hold different single pairs the buffers cannot serve them all: compiled forwards then read
    the per-pair copies (and compile per pair)."""

    def __init__(self, bank: MaskBank) -> None:
        self.bank = bank
        self._names = frozenset(bank.names)
        self._cache: dict[tuple, Tensor] = {}
        self._version = bank.version
        self._static: dict[tuple, Tensor] = {}  # (name, device) -> the set pair's bits
        self._static_devices: set[torch.device] = set()  # devices compiled forwards ran on
        self._static_ok = False  # the buffers hold the one single pair every thread has set
        self.merged: dict | None = None  # materialized(): (name, pair, ...) -> (W ⊙ M, stamp)
        self._merged_depth = 0
        self._init_threads(_DENSE)

    def _init_threads(self, default: PairState) -> None:
        self._default = default  # set_active_pair's setting
        self._fallback = default  # what threads without a setting of their own use
        self._local = threading.local()
        self._lock = threading.Lock()
        self._held: dict[int, PairState] = {}  # thread ident -> setting, most recent last

    def __getstate__(self) -> dict:
        st = self.current()
        d = {k: v for k, v in self.__dict__.items()
             if k not in ("_local", "_lock", "_held", "_default", "_fallback", "_cache",
                          "_static", "_static_devices", "_static_ok", "merged",
                          "_merged_depth")}
        d["_default"] = PairState(st.pair, st.pairs, st.pair_ids, st.batch_dim)
        return d

    def __setstate__(self, d: dict) -> None:
        default = d.pop("_default", _DENSE)
        self.__dict__.update(d)
        self._cache = {}
        self._static, self._static_devices, self._static_ok = {}, set(), False
        self.merged, self._merged_depth = None, 0
        self._init_threads(default)

    # ----------------------------------------------------------------- the active setting

    def current(self) -> PairState:
        """The calling thread's setting."""
        st = getattr(self._local, "state", None)
        return self._fallback if st is None else st

    @property
    def pair(self) -> str | None:
        return self.current().pair

    @property
    def pairs(self) -> tuple[str, ...] | None:
        return self.current().pairs

    @property
    def pair_ids(self) -> Tensor | None:
        return self.current().pair_ids

    @property
    def batch_dim(self) -> int:
        return self.current().batch_dim

    @property
    def active(self) -> bool:
        return self.current().active

    def _hold(self, st: PairState | None) -> None:
        """Make ``st`` the calling thread's setting (None: none of its own) and update what
        threads without one see."""
        ident = threading.get_ident()
        with self._lock:
            self._held.pop(ident, None)
            if st is None:
                with contextlib.suppress(AttributeError):
                    del self._local.state
            else:
                self._local.state = st
                self._held[ident] = st
            live = {t.ident for t in threading.enumerate()}
            for dead in [i for i in self._held if i not in live]:
                del self._held[dead]
            self._fallback = next(reversed(self._held.values()), self._default)

    # ------------------------------------------------------------------------ the bits

    def _fresh(self) -> None:
        if self._version != self.bank.version:
            self._cache.clear()
            if self.merged is not None:
                self.merged.clear()
            self._static.clear()
            self._static_ok = False
            self._names = frozenset(self.bank.names)
            self._version = self.bank.version

    def _device_copy(self, key: tuple, fetch) -> Tensor | None:
        self._fresh()
        if key[1] not in self._names:
            return None
        b = self._cache.get(key)
        if b is None:
            b = self._cache[key] = fetch().to(key[2], non_blocking=True)  # no stream sync
        return b

    def bits(self, name: str, device: torch.device,
             state: PairState | None = None) -> Tensor | None:
        """The active pair's bits for parameter ``name`` on ``device`` (None: not masked)."""
        if torch.compiler.is_compiling():
            if self._static_ok and (name, device) in self._static:
                return self._static[(name, device)]
            self._static_devices.add(device)  # the next single-pair setting makes buffers
        pair = (state or self.current()).pair
        return self._device_copy((pair, name, device), lambda: self.bank.bits(pair, name))

    def _refill_static(self, st: PairState) -> None:
        """Point the static buffers at ``st``'s single pair (see the class text)."""
        with self._lock:
            pairs = {s.pair if s.pair_ids is None else None for s in self._held.values()}
        self._static_ok = st.pair is not None and st.pair_ids is None and pairs == {st.pair}
        if not self._static_ok:
            return
        by_device: dict[torch.device, tuple[list, list]] = {}
        for device in self._static_devices:
            for name in self._names:
                src = self._device_copy((st.pair, name, device),
                                        lambda n=name: self.bank.bits(st.pair, n))
                buf = self._static.get((name, device))
                if buf is None or buf.shape != src.shape:
                    buf = self._static[(name, device)] = torch.empty_like(src)
                dst, srcs = by_device.setdefault(device, ([], []))
                dst.append(buf)
                srcs.append(src)
        with torch.no_grad():
            for dst, srcs in by_device.values():
                torch._foreach_copy_(dst, srcs)

    def stacked(self, name: str, device: torch.device) -> Tensor | None:
        """``int32[P, rows, W]`` bits of every pair of the bank for ``name`` (None: not masked);
        a mixed batch indexes it with the bank's ``pair_index``: any mix of pairs shares one
        copy."""
        return self._device_copy((None, name, device), lambda: self.bank.stack()[name])

    def set(self, pair=None, pair_ids=None, batch_dim: int = 0, *, default: bool = False) -> None:
        """Set the calling thread's active pair (``default=True``: also what threads that never
        set one use; :func:`set_active_pair` does that)."""
        self._fresh()
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
            st = PairState(None, pairs, pair_ids.long(), batch_dim)
        else:
            if pair is not None:
                if not isinstance(pair, str):
                    raise TypeError(f"set_active_pair: pair must be a str or None, got {pair!r}")
                self.bank._check_pair(pair)
            st = PairState(pair, None, None, batch_dim)
        if default:
            self._default = st
        self._hold(st)
        if self._static_devices:
            self._refill_static(st)

    def state(self) -> PairState | None:
        """The calling thread's own setting (None: it has none), for :meth:`restore`."""
        return getattr(self._local, "state", None)

    def restore(self, state: PairState | None) -> None:
        self._hold(state)
        if self._static_devices:
            self._refill_static(self.current())


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
    """Make ``model``'s masked modules use ``pair``'s masks (None: dense, exactly ``nn.Linear``)
    in the calling thread, and in threads that have not set a pair of their own.

    Mixed-pair batches: ``pair=[names]`` and ``pair_ids`` (LongTensor) indexing them, one id per
    batch element (along ``batch_dim`` of the activations) or per row; rows are grouped by pair and
    run by the segmented kernel.
    """
    get_context(model).set(pair, pair_ids, batch_dim, default=True)


@contextlib.contextmanager
def active_pair(
    model: nn.Module,
    pair: str | Sequence[str] | None,
    *,
    pair_ids: Tensor | None = None,
    batch_dim: int = 0,
):
    """``with active_pair(model, "en-de"):`` — ``pair``'s masks for the block only, in the
    calling thread only: threads may run one model with different pairs at the same time."""
    ctx = get_context(model)
    saved = ctx.state()
    ctx.set(pair, pair_ids, batch_dim)
    try:
        yield ctx
    finally:
        ctx.restore(saved)


@contextlib.contextmanager
def materialized(model: nn.Module):
    """``with materialized(model):`` — inside, a forward that needs no gradient, with one pair
    active, runs the dense op (``F.linear``, cuBLAS on a GPU) on ``W ⊙ M`` computed once per
    layer, pair and dtype (:func:`lass_sparse.masked_cast`) and kept until the block ends, as
    PEFT's ``merge_adapter`` for inference: a decoding loop then pays no mask pass per step on
    a GPU's GEMM route and uses cuBLAS's GEMV at few rows. Memory: one masked copy of each
    weight a forward used, per pair, freed when the block ends. A weight changed in place is
    masked again; calls that need a gradient, mixed-pair batches and compiled graphs run as
    outside the block. On the CPU the fused kernels are as fast as dense or faster
    (docs/performance.md): use it on GPUs."""
    ctx = get_context(model)
    with ctx._lock:
        ctx._merged_depth += 1
        if ctx.merged is None:
            ctx.merged = {}
    try:
        yield ctx
    finally:
        with ctx._lock:
            ctx._merged_depth -= 1
            if ctx._merged_depth == 0:
                ctx.merged = None
