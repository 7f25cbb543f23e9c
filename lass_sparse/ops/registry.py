"""Backend registry: which kernels exist, which are active, and which one an op call uses.

Every op in :mod:`lass_sparse.ops` has one schema and one Python body
(:mod:`lass_sparse.ops.bodies`). The body asks :func:`dispatch` for an implementation for the
tensors' device; backends register implementations here with :func:`register` and report their
availability with :func:`set_status`. The choice is, in order:

1. the backend forced with :func:`use_backend` (or the ``LASS_SPARSE_BACKEND`` env var) if it
   implements the op for that device (a forced backend that does not implement the op at all
   falls through to the default order; one that implements it only for other devices, or whose
   ``supports(*args)`` predicate declines the call, raises :class:`BackendCannotServe`: a forced
   kernel never runs on inputs it was not written for);
2. otherwise the active backends by priority (``cuda``, ``triton``, ``cupy``, ``cpu``,
   ``reference``), skipping those whose ``supports(*args)`` predicate declines the call.

The ``reference`` backend implements every op on every device, so the chain always ends.
Kernels registered with ``device_guard=True`` (Triton, cupy: they launch on the *current* CUDA
device) run inside ``torch.cuda.device(tensor's device)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# The torch.library namespace of every op (``torch.ops.lass_sparse.*``) and of the native
# kernels registered under the public names (csrc/common/entry.h).
NS = "lass_sparse"
BACKENDS: tuple[str, ...] = ("reference", "cpu", "triton", "cuda", "cupy")
# Lower number = tried first.
PRIORITY: dict[str, int] = {"cuda": 0, "triton": 1, "cupy": 2, "cpu": 3, "reference": 9}
ENV_VAR = "LASS_SPARSE_BACKEND"


@dataclass(frozen=True)
class Impl:
    backend: str
    fn: Callable
    devices: frozenset[str]
    supports: Callable[..., bool] | None = None
    explicit_only: bool = False
    requires: str = ""
    device_guard: bool = False
    dtypes: frozenset | None = None
    # The kernel checks every tensor it touches itself (dtype, shape, device, layout, aliasing)
    # and raises before touching memory: the op then runs its Python checks only to word the
    # error of a call the kernel refused (see :func:`dispatch_checked`).
    validates: bool = False


@dataclass
class BackendStatus:
    name: str
    active: bool
    reason: str
    # True when the backend *should* work here but does not (e.g. a native module that was built
    # fails to import): tests must fail on it, not skip.
    broken: bool = False


class BackendCannotServe(RuntimeError):
    """A forced backend (``use_backend`` / ``$LASS_SPARSE_BACKEND``) cannot run this call."""


_impls: dict[str, list[Impl]] = {}
_status: dict[str, BackendStatus] = {
    name: BackendStatus(name, False, "not loaded yet") for name in BACKENDS
}
_status["reference"] = BackendStatus("reference", True, "plain PyTorch, always available")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lass_sparse_forced_backend", default=None
)
# Called with the forced backend (None: none) whenever use_backend() enters or leaves, in that
# thread: native kernels that cannot read the context variable keep their own copy (backends/cpu).
_force_listeners: list[Callable[[str | None], None]] = []
# Unforced choices that depend only on (op, device type, dtypes): no ``supports`` predicate was
# consulted. Cleared whenever a kernel is registered or a backend's status changes.
_select_cache: dict[tuple, Impl] = {}


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def set_status(name: str, active: bool, reason: str, broken: bool = False) -> None:
    """Record whether backend ``name`` is usable and, if not, why (one actionable sentence).

    ``broken``: inactive although it should work here (built but fails to load)."""
    _check_name(name)
    _status[name] = BackendStatus(name, active, reason, broken and not active)
    _select_cache.clear()


def status() -> dict[str, BackendStatus]:
    return dict(_status)


def register(
    op: str,
    backend: str,
    devices: tuple[str, ...] | str,
    supports: Callable[..., bool] | None = None,
    explicit_only: bool = False,
    requires: str = "",
    device_guard: bool = False,
    dtypes: tuple[torch.dtype, ...] | None = None,
    validates: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s kernel of ``op`` for ``devices``.

    ``supports(*args)`` may decline individual calls (e.g. a GEMV kernel only for small M);
    declined calls go to the next backend, or raise :class:`BackendCannotServe` when the
    backend is forced; ``requires`` says in words what ``supports`` checks (for that error).
    ``explicit_only`` kernels run only while their backend is forced (e.g. Triton on CPU
    tensors under ``TRITON_INTERPRET=1``, for tests). ``device_guard``: run CUDA calls inside
    ``torch.cuda.device(device)`` (kernels that launch on the current device). ``dtypes``: the
    floating dtypes the kernel takes (of the first argument); other calls are declined with an
    error that names the dtype when the backend is forced. ``validates``: the kernel checks every
    tensor it touches and raises before writing anything (C++ entry points), so unforced calls
    skip the op's Python checks until the kernel refuses.
    """
    _check_name(backend)
    devs = frozenset((devices,) if isinstance(devices, str) else devices)

    def deco(fn: Callable) -> Callable:
        lst = _impls.setdefault(op, [])
        lst[:] = [i for i in lst if not (i.backend == backend and i.devices & devs)]
        lst.append(Impl(backend, fn, devs, supports, explicit_only, requires, device_guard,
                        None if dtypes is None else frozenset(dtypes), validates))
        lst.sort(key=lambda i: PRIORITY[i.backend])
        _select_cache.clear()
        return fn

    return deco


def on_force(fn: Callable[[str | None], None]) -> None:
    """Call ``fn(name)`` whenever :func:`use_backend` changes this thread's forced backend
    (``None`` on leaving the outermost block; ``$LASS_SPARSE_BACKEND`` is then in force)."""
    _force_listeners.append(fn)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend`, else by ``$LASS_SPARSE_BACKEND``, else None."""
    name = _forced.get()
    if name is None:
        name = os.environ.get(ENV_VAR) or None
        if name is not None:
            _check_name(name)
            if not _status[name].active:
                raise RuntimeError(
                    f"{ENV_VAR}={name} but backend {name!r} is not active: {_status[name].reason}"
                )
    return name


_UNSET = object()


def select(op: str, device_type: str, *args, forced=_UNSET) -> Impl:
    """The implementation of ``op`` that a call with these args on ``device_type`` uses
    (``forced``: :func:`forced_backend`'s answer, when the caller already has it)."""
    impls = _impls.get(op)
    if not impls:
        raise RuntimeError(f"lass_sparse: no kernel registered for op {op!r}")
    if forced is _UNSET:
        forced = forced_backend()
    if forced is not None:
        own = [i for i in impls if i.backend == forced]
        if own:
            for i in own:
                if device_type in i.devices:
                    bad = _unsupported_dtype(i, args)
                    if bad is not None:
                        raise BackendCannotServe(
                            f"lass_sparse.{op}: backend {forced} does not support {_dt(bad)} for "
                            f"{op}; supported: {_dtype_list(i.dtypes)}. Leave the backend "
                            "unforced to fall back to the next one"
                        )
                    if i.supports is not None and not i.supports(*args):
                        raise BackendCannotServe(
                            f"lass_sparse.{op}: forced backend {forced!r} cannot serve this call "
                            f"({_describe(args)}); its kernel needs "
                            f"{i.requires or 'other inputs'}. Leave the backend unforced to fall "
                            "back to the next one"
                        )
                    return i
            devs = sorted(set().union(*(i.devices for i in own)))
            raise BackendCannotServe(
                f"lass_sparse.{op}: forced backend {forced!r} has no kernel for {device_type} "
                f"tensors (it runs on: {', '.join(devs)})"
            )
    key = (op, device_type, _dtypes(args))
    hit = _select_cache.get(key)
    if hit is not None:
        return hit
    cacheable = True
    for i in impls:
        if device_type not in i.devices or not _status[i.backend].active or i.explicit_only:
            continue
        if _unsupported_dtype(i, args) is not None:
            continue
        if i.supports is not None:
            cacheable = False  # the choice depends on more than dtypes (e.g. the row count)
            if not i.supports(*args):
                continue
        if cacheable:
            _select_cache[key] = i
        return i
    raise RuntimeError(f"lass_sparse.{op}: no active kernel for {device_type} tensors")


def _dtypes(args) -> object:
    """The floating dtypes :func:`_unsupported_dtype` looks at (the first argument's)."""
    if not args:
        return None
    first = args[0]
    if isinstance(first, torch.Tensor):
        return first.dtype
    if isinstance(first, (list, tuple)):
        return frozenset(t.dtype for t in first if isinstance(t, torch.Tensor))
    return None


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_DTYPE_ORDER = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _dtype_list(dtypes) -> str:
    names = [_dt(d) for d in sorted(dtypes, key=lambda d: (d not in _DTYPE_ORDER,
                                                          _DTYPE_ORDER.index(d)
                                                          if d in _DTYPE_ORDER else 0, str(d)))]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _unsupported_dtype(impl: Impl, args) -> torch.dtype | None:
    """The first floating dtype of the call's first argument that ``impl`` does not take."""
    if impl.dtypes is None or not args:
        return None
    first = args[0]
    for t in first if isinstance(first, (list, tuple)) else (first,):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in impl.dtypes:
            return t.dtype
    return None


def _describe(args) -> str:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}")
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            dts = sorted({str(t.dtype).replace("torch.", "") for t in a})
            out.append(f"{len(a)} tensors of {'/'.join(dts)}")
    return ", ".join(out[:4]) or "no tensors"


def _run(impl: Impl, device, dev_type: str, args):
    if impl.device_guard and dev_type == "cuda":
        index = (device if isinstance(device, torch.device) else torch.device(device)).index
        if index is not None and index != torch.cuda.current_device():
            with torch.cuda.device(index):
                return impl.fn(*args)
    return impl.fn(*args)


def dispatch(op: str, device: str | torch.device, *args):
    """Run the selected implementation of ``op`` for tensors on ``device``."""
    dev_type = device.type if isinstance(device, torch.device) else device.split(":")[0]
    return _run(select(op, dev_type, *args), device, dev_type, args)


def dispatch_checked(op: str, device: str | torch.device, check: Callable[[], None], *args):
    """:func:`dispatch` for an op whose input checks are ``check()`` (raises on bad input).

    A kernel registered with ``validates=True`` checks its inputs itself, so an unforced call
    runs it straight away and calls ``check()`` only when the kernel raises, to replace the
    kernel's error with the op's (the kernel's propagates when ``check()`` finds nothing wrong).
    Other kernels, and every call under a forced backend, run ``check()`` first."""
    dev_type = device.type if isinstance(device, torch.device) else device.split(":")[0]
    forced = forced_backend()
    if forced is not None:
        check()
        return _run(select(op, dev_type, *args, forced=forced), device, dev_type, args)
    impl = select(op, dev_type, *args, forced=None)
    if not impl.validates:
        check()
        return _run(impl, device, dev_type, args)
    try:
        return _run(impl, device, dev_type, args)
    except (RuntimeError, ValueError, TypeError, IndexError):
        check()
        raise


def broken() -> dict[str, str]:
    """Backends that should work here but do not: name -> reason."""
    return {n: s.reason for n, s in _status.items() if s.broken}


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend ``name`` for ops it implements, inside the ``with`` block.

    Raises ``RuntimeError`` (with the reason) if the backend is not active.
    """
    _check_name(name)
    st = _status[name]
    if not st.active:
        raise RuntimeError(f"backend {name!r} is not active: {st.reason}")
    token = _forced.set(name)
    for fn in _force_listeners:
        fn(name)
    try:
        yield
    finally:
        _forced.reset(token)
        for fn in _force_listeners:
            fn(_forced.get())
