"""MaskedMultiheadAttention: nn.MultiheadAttention with per-projection packed masks, KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import ops
from .context import MaskContext
from .linear import MaskedLinear, _autocast, masked_forward


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


class MaskedMultiheadAttention(nn.MultiheadAttention):
    """Drop-in ``nn.MultiheadAttention`` (same constructor, parameters, state_dict keys: the packed
    ``in_proj_weight [3E, E]`` and ``out_proj``) whose projections use the active pair's masks:
    ``in_proj_weight`` carries one mask per q/k/v block (stacked rows), ``out_proj.weight`` its own.

    Self-attention runs the fused ``masked_qkv_proj`` (q, k, v straight into the
    ``[B, H, T, Dh]`` layout of ``scaled_dot_product_attention``). ``forward(..., cache=dict)``
    supports incremental decoding: self-attention appends the new keys/values to ``cache``;
    with ``static_kv=True`` (cross-attention) keys/values are computed once and reused.

    Supports ``kdim = vdim = embed_dim`` without ``add_bias_kv``/``add_zero_attn``.
    """

    _lass_ctx: MaskContext | None = None
    _lass_prefix: str = ""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None) -> None:
        if add_bias_kv or add_zero_attn or kdim not in (None, embed_dim) or vdim not in (
            None, embed_dim
        ):
            raise NotImplementedError(
                "MaskedMultiheadAttention supports kdim = vdim = embed_dim without add_bias_kv "
                "or add_zero_attn"
            )
        super().__init__(embed_dim, num_heads, dropout, bias, False, False, None, None,
                         batch_first, device, dtype)
        self.out_proj = MaskedLinear.from_linear(self.out_proj)

    @classmethod
    def supports(cls, mha: nn.MultiheadAttention) -> bool:
        return (mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> MaskedMultiheadAttention:
        """A masked copy sharing ``mha``'s parameters."""
        if not cls.supports(mha):
            raise NotImplementedError(
                "from_mha: kdim/vdim != embed_dim, add_bias_kv and add_zero_attn are unsupported")
        m = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
                batch_first=mha.batch_first, device="meta")
        m.in_proj_weight = mha.in_proj_weight
        m.in_proj_bias = mha.in_proj_bias
        m.out_proj = MaskedLinear.from_linear(mha.out_proj)
        m.train(mha.training)
        return m

    def _lass_param_names(self) -> list[str]:
        return ["in_proj_weight", "out_proj.weight"]

    def _proj(self, x: Tensor, part: int) -> Tensor:
        e = self.embed_dim
        rows = slice(part * e, (part + 1) * e)
        b = None if self.in_proj_bias is None else self.in_proj_bias[rows]
        y = masked_forward(self._lass_ctx, self._lass_prefix + "in_proj_weight", x,
                           self.in_proj_weight[rows], b, rows=rows, batch_dim=0)
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
        if (ctx is None or not ctx.active) and cache is None:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
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
        single = ctx is not None and ctx.active and ctx.pair_ids is None
        bits = ctx.bits(self._lass_prefix + "in_proj_weight", query.device) if single else None
        if is_self and cache is None and bits is not None:
            x, w, b = _autocast(query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = ops.masked_qkv_proj(x, w, bits, b, self.num_heads)
        else:
            q = self._proj(query, 0)
            if cache is not None and static_kv and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self._proj(key, 1), self._proj(value, 2)
                if cache is not None:
                    if not static_kv and "k" in cache:
                        k = torch.cat([cache["k"], k], 2)
                        v = torch.cat([cache["v"], v], 2)
                    cache["k"], cache["v"] = k, v
        tk = k.shape[2]
        mask = _additive(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.view(1, 1, tq, tk) if mask.dim() == 2 else mask.view(bsz, -1, tq, tk)
        if key_padding_mask is not None:
            kp = _additive(key_padding_mask, q.dtype).view(bsz, 1, 1, tk)
            mask = kp if mask is None else mask + kp
        causal = is_causal and attn_mask is None
        if causal and (mask is not None or tq != tk):  # build it: SDPA's is_causal is top-left
            c = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
            c = _additive(~c, q.dtype).view(1, 1, tq, tk)
            mask = c if mask is None else mask + c
            causal = False
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            if mask is not None:
                scores = scores + mask
            if causal:
                scores = scores.masked_fill(
                    ~torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, p, self.training) @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            out = _sdpa(q, k, v, mask, p, causal)
        out = out.transpose(1, 2).reshape(bsz, tq, e)
        out = masked_forward(ctx, self._lass_prefix + "out_proj.weight", out,
                             self.out_proj.weight, self.out_proj.bias, batch_dim=0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights
