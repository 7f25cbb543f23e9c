"""MaskedMultiheadAttention: nn.MultiheadAttention with per-projection packed masks, KV cache."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import ops
from .context import MaskContext, PairState
from .linear import MaskedLinear, _autocast, masked_dense_weight, masked_forward


def _cpu_math_sdpa(x: Tensor):
    """The math SDPA backend for a CPU forward under autograd (see :func:`_sdpa`), also on the
    dense path that defers to ``nn.MultiheadAttention``."""
    if x.device.type == "cpu" and torch.is_grad_enabled():
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float,
          causal: bool) -> Tensor:
    """``F.scaled_dot_product_attention``; on the CPU under autograd with the math backend: the
    CPU flash kernel's backward made a whole training step of the tiny LaSS model 2-3x slower
    (586 -> 198 ms bf16, 457 -> 249 ms fp32, 1 thread, batch 64x14), while its forward is the
    faster one for inference."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
    ):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                  is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """nn.MultiheadAttention masks (bool: True = not allowed; float: added) -> additive float."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf"))
    return mask.to(dtype)


def _store(cache: dict, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    cache["k"], cache["v"] = k, v
    return k, v


def _append(cache: dict, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Self-attention's keys/values so far: the cached ones, then this step's ([B, H, T, Dh])."""
    if "k" in cache:
        k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
    return _store(cache, k, v)


class MaskedMultiheadAttention(nn.MultiheadAttention):
    """Drop-in ``nn.MultiheadAttention``: same constructor, parameters and state_dict keys, every
    configuration (``kdim``/``vdim``, ``add_bias_kv``, ``add_zero_attn``, ``batch_first``, bool
    and float masks, ``need_weights`` / ``average_attn_weights``, ``is_causal``). Its projections
    use the active pair's masks: the packed ``in_proj_weight [3E, E]`` carries one mask per
    q/k/v block (stacked rows; pruned as 3 chunks); with ``kdim``/``vdim != embed_dim`` each of
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` has its own mask; ``out_proj.weight``
    its own. Biases (``in_proj_bias``, ``bias_k``, ``bias_v``) are never masked.

    Self-attention with the packed weight runs the fused ``masked_qkv_proj`` (q, k, v straight
    into the ``[B, H, T, Dh]`` layout of ``scaled_dot_product_attention``).
    ``forward(..., cache=dict)`` supports incremental decoding: self-attention appends the new
    keys/values to ``cache``; with ``static_kv=True`` (cross-attention) keys/values are computed
    once and reused (``bias_k``/``bias_v`` and the zero attention slot are appended after the
    cache, as a full pass has them). ``is_causal=True`` without ``attn_mask`` (an error for
    ``nn.MultiheadAttention``) masks causally, aligned to the last key when the cache holds
    earlier ones.
    """

    _lass_ctx: MaskContext | None = None
    _lass_prefix: str = ""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                         vdim, batch_first, device, dtype)
        self.out_proj = MaskedLinear.from_linear(self.out_proj)

    @classmethod
    def supports(cls, mha: nn.MultiheadAttention) -> bool:
        """Every ``nn.MultiheadAttention`` configuration is supported (kept for callers that
        asked)."""
        return isinstance(mha, nn.MultiheadAttention)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> MaskedMultiheadAttention:
        """A masked copy sharing ``mha``'s parameters."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_mha: expected nn.MultiheadAttention, got "
                            f"{type(mha).__name__}")
        m = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
                add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn,
                kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first, device="meta")
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "in_proj_bias", "bias_k", "bias_v"):
            setattr(m, name, getattr(mha, name))
        m.out_proj = MaskedLinear.from_linear(mha.out_proj)
        m.train(mha.training)
        return m

    def _lass_param_names(self) -> list[str]:
        if self._qkv_same_embed_dim:
            return ["in_proj_weight", "out_proj.weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]

    def _proj(self, x: Tensor, part: int, state: PairState | None = None) -> Tensor:
        e = self.embed_dim
        rows = slice(part * e, (part + 1) * e)
        b = None if self.in_proj_bias is None else self.in_proj_bias[rows]
        if self._qkv_same_embed_dim:
            y = masked_forward(self._lass_ctx, self._lass_prefix + "in_proj_weight", x,
                               self.in_proj_weight[rows], b, rows=rows, batch_dim=0,
                               state=state)
        else:
            name = ("q_proj_weight", "k_proj_weight", "v_proj_weight")[part]
            y = masked_forward(self._lass_ctx, self._lass_prefix + name, x,
                               getattr(self, name), b, batch_dim=0, state=state)
        bsz, t, _ = y.shape
        return y.view(bsz, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        cache: dict | None = None,
        static_kv: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        ctx = self._lass_ctx
        st = None if ctx is None else ctx.current()  # read once: one setting per call
        if (st is None or not st.active) and cache is None:
            with _cpu_math_sdpa(query):
                return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                       need_weights=need_weights, attn_mask=attn_mask,
                                       average_attn_weights=average_attn_weights,
                                       is_causal=is_causal)
        is_self = key is query and value is query
        batched = query.dim() == 3
        if not batched:
            bd = 0 if self.batch_first else 1
            query, key, value = (t.unsqueeze(bd) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tq, e = query.shape
        h, dh = self.num_heads, self.head_dim
        single = st is not None and st.active and st.pair_ids is None
        bits = None
        if single and self._qkv_same_embed_dim and is_self and not static_kv:
            bits = ctx.bits(self._lass_prefix + "in_proj_weight", query.device, st)
        wm = None if bits is None else masked_dense_weight(
            ctx, st, self._lass_prefix + "in_proj_weight", query, self.in_proj_weight, bits)
        if bits is not None:
            if wm is not None:  # W ⊙ M (autocast's cast, or materialized()), the dense op
                y = F.linear(query, wm, self.in_proj_bias)
                q, k, v = y.view(bsz, tq, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
            else:  # one fused launch for q, k, v (cached decoding steps too)
                x, w, b = _autocast(query, self.in_proj_weight, self.in_proj_bias)
                q, k, v = ops.masked_qkv_proj(x, w, bits, b, h)
            if cache is not None:
                k, v = _append(cache, k, v)
        else:
            q = self._proj(query, 0, st)
            if cache is not None and static_kv and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self._proj(key, 1, st), self._proj(value, 2, st)
                if cache is not None:
                    k, v = (_append(cache, k, v) if not static_kv
                            else _store(cache, k, v))
        tk0 = k.shape[2]  # keys from the inputs (and cache); bias_k / zero slot follow
        extra = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.to(k.dtype).view(1, h, 1, dh).expand(bsz, h, 1, dh)],
                          2)
            v = torch.cat([v, self.bias_v.to(v.dtype).view(1, h, 1, dh).expand(bsz, h, 1, dh)],
                          2)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, h, 1, dh)], 2)
            v = torch.cat([v, v.new_zeros(bsz, h, 1, dh)], 2)
            extra += 1
        tk = tk0 + extra
        causal = False
        mask = None
        if is_causal and attn_mask is not None and key_padding_mask is None and not need_weights:
            causal = True  # nn.MultiheadAttention's hint: SDPA's causal mask replaces attn_mask
        else:
            mask = _additive(attn_mask, q.dtype)
            if mask is not None:
                mask = (mask.view(1, 1, tq, tk0) if mask.dim() == 2
                        else mask.view(bsz, h, tq, tk0))
            if key_padding_mask is not None:
                kp = _additive(key_padding_mask, q.dtype).view(bsz, 1, 1, tk0)
                mask = kp if mask is None else mask + kp
            if is_causal and attn_mask is None:  # our extension; bottom-right with a cache
                if mask is None and extra == 0 and tq == tk0:
                    causal = True
                else:
                    c = torch.ones(tq, tk0, dtype=torch.bool, device=q.device).tril(tk0 - tq)
                    c = _additive(~c, q.dtype).view(1, 1, tq, tk0)
                    mask = c if mask is None else mask + c
            if mask is not None and extra:
                mask = F.pad(mask, (0, extra))
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(dh))) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            if causal:
                scores = scores.masked_fill(
                    ~torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
            weights = scores.softmax(-1)
            if p > 0.0:
                weights = F.dropout(weights, p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            out = _sdpa(q, k, v, mask, p, causal)
        out = out.transpose(1, 2).reshape(bsz, tq, e)
        out = masked_forward(ctx, self._lass_prefix + "out_proj.weight", out,
                             self.out_proj.weight, self.out_proj.bias, batch_dim=0, state=st)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights
