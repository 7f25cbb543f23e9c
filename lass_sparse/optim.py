"""MaskedAdamW: AdamW that updates only the active pairs' sub-networks (fused masked kernel)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from . import ops
from .masks import MaskBank

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch without distributed
    _DTensor = ()


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """As ``torch.optim.AdamW`` checks them (NaN fails every comparison, so it is refused), plus
    finiteness: an infinite lr, eps or weight decay makes every updated entry NaN."""
    if isinstance(lr, Tensor):
        lr = float(lr)
    if not (0.0 <= lr and math.isfinite(lr)):
        raise ValueError(f"MaskedAdamW: invalid learning rate lr={lr}: must be finite and >= 0")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"MaskedAdamW: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"MaskedAdamW: invalid beta parameter betas[{i}]={beta}: must be in "
                             "[0, 1)")
    if not (0.0 <= eps and math.isfinite(eps)):
        raise ValueError(f"MaskedAdamW: invalid epsilon value eps={eps}: must be finite and >= 0")
    if not (0.0 <= weight_decay and math.isfinite(weight_decay)):
        raise ValueError(f"MaskedAdamW: invalid weight_decay value {weight_decay}: must be "
                         "finite and >= 0")


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW whose step changes, for each masked parameter, only the entries inside the mask of the
    pairs trained since the last step (bitwise OR: gradient accumulation over several pairs);
    off-mask ``p``, ``exp_avg`` and ``exp_avg_sq`` stay bit-for-bit unchanged. Parameters without a
    mask (embeddings, norms, biases) get plain AdamW. State is float32 for any param dtype.

    Usage::

        opt = MaskedAdamW(model.parameters(), lr=5e-4)
        opt.bind(model, bank)          # which params the bank masks
        ...loss.backward(); opt.note_pair("en-de"); opt.step(); opt.zero_grad()

    Low level: ``set_masks({param: bits or None})`` fixes the masks explicitly (kept until changed).

    ``capturable=True`` (as ``torch.optim.AdamW``'s): the step counts are float32 tensors on the
    params' devices, advanced and read on the device (``masked_adamw_capturable_``), and the
    learning rate is a device tensor (``lr`` may be a tensor: change it in place between graph
    replays, or a float: set again on the next eager step), so the whole training step —
    forward, backward, ``opt.step()`` — can be captured in a CUDA graph and replayed. The masks
    are chosen on the host when the step is captured: capture one graph per pair (or pair set)
    and replay the one of the batch's pair.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        capturable: bool = False,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize, capturable=bool(capturable)))
        self._bank: MaskBank | None = None
        self._names: dict[int, str] = {}  # id(param) -> bank name
        self._pairs: list[str] = []
        self._explicit: dict[int, Tensor | None] | None = None
        self._union_cache: dict[tuple, dict[int, Tensor]] = {}  # (pairs, bank version) -> bits
        self._lr_tensors: dict[tuple, tuple[float, Tensor]] = {}  # (group, device) -> lr

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, but a parameter listed twice in one
        group is an error (torch only warns): one fused step would update it twice."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen: set[int] = set()
        for p in params:
            if id(p) in seen:
                raise ValueError("MaskedAdamW: a parameter group lists the same parameter twice "
                                 f"(shape {list(p.shape)}); pass each parameter once")
            seen.add(id(p))
        merged = {**self.defaults, **param_group} if self.defaults else param_group
        if self.defaults:
            _check_hyperparameters(merged["lr"], merged["betas"], merged["eps"],
                                   merged["weight_decay"])
        super().add_param_group({**param_group, "params": params})

    # ------------------------------------------------------------------------------ masks

    def bind(self, model: nn.Module, bank: MaskBank) -> MaskedAdamW:
        """Mask the parameters of ``model`` that ``bank`` covers (by name).

        A masked name that is an alias of a parameter also used unmasked (a tied output head:
        the embedding lookup reads the same matrix) is not masked here: the whole matrix
        trains, and the masked forward already zeroes the head's off-mask gradient."""
        ours = {id(p) for g in self.param_groups for p in g["params"]}
        names_of: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(p), []).append(n)
        self._names = {}
        for name in bank.names:
            p = model.get_parameter(name)
            if tuple(p.shape) != bank.shapes[name]:
                raise ValueError(f"MaskedAdamW.bind: bank shape {list(bank.shapes[name])} for "
                                 f"{name!r}, parameter is {list(p.shape)}")
            if any(n not in bank.shapes for n in names_of.get(id(p), [])):
                continue  # also registered under an unmasked name (tied head): dense update
            if id(p) in ours:
                self._names[id(p)] = name
        self._bank = bank
        self._union_cache.clear()
        return self

    def note_pair(self, *pairs: str) -> None:
        """Record that the coming step's gradients include ``pairs`` (their masks are OR-ed)."""
        if self._bank is None:
            raise RuntimeError("MaskedAdamW.note_pair: call bind(model, bank) first")
        for p in pairs:
            self._bank._check_pair(p)
            if p not in self._pairs:
                self._pairs.append(p)

    @property
    def pending_pairs(self) -> list[str]:
        return list(self._pairs)

    def set_masks(self, masks: Mapping[Tensor, Tensor | None] | None) -> None:
        """Explicit masks by parameter (``None`` entries: plain AdamW); ``None`` clears them."""
        self._explicit = None if masks is None else {id(p): b for p, b in masks.items()}

    def _masks_for_step(self) -> dict[int, Tensor | None]:
        if self._explicit is not None:
            return self._explicit
        if self._bank is None or not self._names:
            return {}
        if not self._pairs:
            raise RuntimeError(
                "MaskedAdamW.step: no pair noted since the last step; call note_pair(pair) after "
                "backward (or set_masks(...) for explicit masks)"
            )
        key = (tuple(sorted(self._pairs)), self._bank.version)
        if key not in self._union_cache:
            if len(self._union_cache) >= 64 or any(k[1] != key[1] for k in self._union_cache):
                self._union_cache.clear()  # bank changed, or many pair combinations seen
            union = self._bank.union(self._pairs)
            self._union_cache[key] = {pid: union[name] for pid, name in self._names.items()}
        return self._union_cache[key]

    @staticmethod
    def _on_device(masks: dict, pid: int, device: torch.device) -> Tensor:
        """``masks[pid]`` on ``device``; the copy replaces the cached entry, so later steps with
        the same pairs reuse it (a GPU step would otherwise copy every mask each step)."""
        bits = masks[pid]
        if bits.device != device:
            bits = masks[pid] = bits.to(device, non_blocking=True)  # no stream sync
        return bits

    def load_state_dict(self, state_dict: dict) -> None:
        """As the base class's; the step counts follow each group's ``capturable``: a float32
        tensor on the param's device, or an int (so either kind of checkpoint loads into
        either kind of optimizer). ``capturable`` is a mode of this optimizer, not a
        hyperparameter: the constructor's value stays, whatever the checkpoint's groups say."""
        modes = [g.get("capturable", False) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, mode in zip(self.param_groups, modes):
            group["capturable"] = mode
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                for k in ("exp_avg", "exp_avg_sq"):  # the base class casts to the param dtype
                    if k in st:
                        st[k] = st[k].float().contiguous()
                if "step" in st:
                    st["step"] = self._step_state(st["step"], group, p.device)

    @staticmethod
    def _step_state(step, group: dict, device: torch.device):
        if group.get("capturable"):
            if isinstance(step, Tensor):
                return step.detach().to(device=device, dtype=torch.float32).reshape(()).clone()
            return torch.tensor(float(step), dtype=torch.float32, device=device)
        return int(step) if isinstance(step, Tensor) else step  # one sync, at load time

    # ------------------------------------------------------------------------------- step

    @staticmethod
    def _local(p: Tensor, bits: Tensor | None):
        """(param, grad, bits) as local tensors: FSDP2 shards parameters row-wise (DTensor), and
        the packed bits of those rows are the same row slice (bits are packed along K)."""
        if not isinstance(p, _DTensor):
            return p, p.grad, bits
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = p.to_local()
        grad = p.grad.to_local() if isinstance(p.grad, _DTensor) else p.grad
        if bits is not None:
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                                  p.placements)
            if any(o for o in offset[1:]) or tuple(shape[1:]) != tuple(p.shape[1:]):
                raise NotImplementedError("MaskedAdamW: only row-sharded (dim 0) DTensor params")
            bits = bits[offset[0]:offset[0] + shape[0]]
        return local, grad, bits

    def _items(self, group: dict, masks: dict) -> list[tuple]:
        """(param, local param, grad, bits) of the group's params with a gradient; state made
        on first use (the step count: int, or a float32 device tensor when capturable)."""
        items = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MaskedAdamW does not support sparse gradients")
            bits = masks.get(id(p))
            if bits is not None and bits.device != p.device:
                bits = (bits.to(p.device, non_blocking=True) if self._explicit is not None
                        else self._on_device(masks, id(p), p.device))
            local, grad, bits = self._local(p, bits)
            st = self.state[p]
            if not st:
                st["step"] = self._step_state(0, group, local.device)
                st["exp_avg"] = torch.zeros(local.shape, dtype=torch.float32,
                                            device=local.device)
                st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
            items.append((p, local, grad, bits))
        return items

    def _lr_tensor(self, group: dict, device: torch.device) -> Tensor:
        """The group's lr as a 1-element tensor on ``device``: the group's own tensor (moved if
        elsewhere), or one kept per (group, device) and refilled when the float changes."""
        lr = group["lr"]
        if isinstance(lr, Tensor):
            return lr if lr.device == device else lr.to(device)
        key = (id(group), device)
        got = self._lr_tensors.get(key)
        if got is None:
            got = (lr, torch.full((), float(lr), dtype=torch.float32, device=device))
        elif got[0] != lr:
            got = (lr, got[1].fill_(float(lr)))
        self._lr_tensors[key] = got
        return got[1]

    def _step_capturable(self, group: dict, items: list[tuple]) -> None:
        """One ``masked_adamw_capturable_`` per device: steps advanced on the device, read by
        the kernels (nothing read on the host)."""
        by_device: dict[torch.device, list] = {}
        for it in items:
            by_device.setdefault(it[1].device, []).append(it)
        b1, b2 = group["betas"]
        for device, its in by_device.items():
            ps = [p for p, *_ in its]
            steps = [self.state[p]["step"] for p in ps]
            torch._foreach_add_(steps, 1)
            ops.masked_adamw_capturable_(
                [t[1] for t in its], [t[2] for t in its], [self.state[p]["exp_avg"] for p in ps],
                [self.state[p]["exp_avg_sq"] for p in ps], [t[3] for t in its],
                state_steps=steps, lr=self._lr_tensor(group, device), beta1=b1, beta2=b2,
                eps=group["eps"], weight_decay=group["weight_decay"],
                maximize=group["maximize"],
            )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masks = self._masks_for_step()
        for group in self.param_groups:
            items = self._items(group, masks)
            if group.get("capturable"):
                self._step_capturable(group, items)
                continue
            buckets: dict[tuple, list] = {}
            for p, local, grad, bits in items:
                st = self.state[p]
                st["step"] += 1
                buckets.setdefault((st["step"], local.device), []).append((p, local, grad, bits))
            b1, b2 = group["betas"]
            for (step, _), its in buckets.items():
                ps = [p for p, *_ in its]
                ops.masked_adamw_(
                    [t[1] for t in its], [t[2] for t in its],
                    [self.state[p]["exp_avg"] for p in ps],
                    [self.state[p]["exp_avg_sq"] for p in ps], [t[3] for t in its],
                    lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"],
                    weight_decay=group["weight_decay"], step=step, maximize=group["maximize"],
                )
        self._pairs = []
        return loss
