"""The LaSS Transformer: encoder-decoder built from lass_sparse.nn masked modules.

Pre-norm layers, GeLU, learned positional embeddings, one embedding matrix shared by encoder,
decoder and the output projection. Every attention and feed-forward weight is masked per pair;
with ``mask_output_proj`` the tied output projection is masked too (``decoder.output_projection``,
as the released LaSS code ran it) while the embedding lookup stays dense. Embeddings, norms and
biases are shared (LaSS).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MaskedLinear, MaskedMultiheadAttention, MaskedTiedLinear
from .tokenizer import PAD


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int = 128
    heads: int = 4
    ffn: int = 256
    enc_layers: int = 2
    dec_layers: int = 2
    max_len: int = 128
    dropout: float = 0.1
    attn_dropout: float = 0.0
    # False for configs written before the option existed (their output projection was dense).
    mask_output_proj: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# Paper sizes: base/big are the Transformer-base/-big of LaSS; tiny trains in minutes on a CPU.
CONFIGS = {
    "tiny": dict(d_model=128, heads=4, ffn=512, enc_layers=2, dec_layers=2),
    "small": dict(d_model=256, heads=4, ffn=1024, enc_layers=6, dec_layers=6),
    "base": dict(d_model=512, heads=8, ffn=2048, enc_layers=6, dec_layers=6),
    "big": dict(d_model=1024, heads=16, ffn=4096, enc_layers=6, dec_layers=6, dropout=0.3),
}


def make_config(name: str, vocab_size: int, **overrides) -> ModelConfig:
    if name not in CONFIGS:
        raise KeyError(f"unknown model config {name!r}; choose from {sorted(CONFIGS)}")
    return ModelConfig(vocab_size=vocab_size, **{**CONFIGS[name], **overrides})


class _FFN(nn.Module):
    def __init__(self, d: int, f: int, p: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.p = MaskedLinear(d, f), MaskedLinear(f, d), p

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.dropout(F.gelu(self.fc1(x)), self.p, self.training))


class EncoderLayer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.self_attn = MaskedMultiheadAttention(c.d_model, c.heads, c.attn_dropout,
                                                  batch_first=True)
        self.ffn, self.p = _FFN(c.d_model, c.ffn, c.dropout), c.dropout

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        h = self.norm1(x)
        h = self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        x = x + F.dropout(h, self.p, self.training)
        return x + F.dropout(self.ffn(self.norm2(x)), self.p, self.training)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(c.d_model) for _ in range(3))
        self.self_attn = MaskedMultiheadAttention(c.d_model, c.heads, c.attn_dropout,
                                                  batch_first=True)
        self.cross_attn = MaskedMultiheadAttention(c.d_model, c.heads, c.attn_dropout,
                                                   batch_first=True)
        self.ffn, self.p = _FFN(c.d_model, c.ffn, c.dropout), c.dropout

    def forward(self, x, memory, mem_pad, cache: dict | None = None) -> Tensor:
        h = self.norm1(x)
        if cache is None:
            t = x.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            h = self.self_attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        else:  # incremental: keys/values of earlier positions come from the cache
            h = self.self_attn(h, h, h, need_weights=False, cache=cache.setdefault("self", {}))[0]
        x = x + F.dropout(h, self.p, self.training)
        h = self.norm2(x)
        h = self.cross_attn(h, memory, memory, key_padding_mask=mem_pad, need_weights=False,
                            cache=None if cache is None else cache.setdefault("cross", {}),
                            static_kv=True)[0]
        x = x + F.dropout(h, self.p, self.training)
        return x + F.dropout(self.ffn(self.norm3(x)), self.p, self.training)


class _Stack(nn.Module):
    def __init__(self, layers: list[nn.Module], d: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d)


class Seq2Seq(nn.Module):
    """``forward(src, tgt_in) -> logits``; ``src`` starts with a language token (the source's or
    the target's, see the run's ``langtok``), ``tgt_in`` with the target-language token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=c.d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
        self.enc_pos = nn.Embedding(c.max_len, c.d_model)
        self.dec_pos = nn.Embedding(c.max_len, c.d_model)
        self.encoder = _Stack([EncoderLayer(c) for _ in range(c.enc_layers)], c.d_model)
        self.decoder = _Stack([DecoderLayer(c) for _ in range(c.dec_layers)], c.d_model)
        if c.mask_output_proj:  # no parameters of its own: state_dict keys are the same
            self.decoder.output_projection = MaskedTiedLinear(self.embed)
        self.scale = math.sqrt(c.d_model)

    def _embed(self, ids: Tensor, pos: nn.Embedding, start: int = 0) -> Tensor:
        if ids.shape[1] + start > self.config.max_len:
            raise ValueError(f"sequence of {ids.shape[1] + start} tokens exceeds max_len "
                             f"{self.config.max_len}")
        p = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.embed(ids) * self.scale + pos(p)
        return F.dropout(x, self.config.dropout, self.training)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        pad = src.eq(PAD)
        x = self._embed(src, self.enc_pos)
        for layer in self.encoder.layers:
            x = layer(x, pad)
        return self.encoder.norm(x), pad

    def decode(self, tgt_in: Tensor, memory: Tensor, mem_pad: Tensor,
               cache: list[dict] | None = None, start: int = 0) -> Tensor:
        x = self._embed(tgt_in, self.dec_pos, start)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, memory, mem_pad, None if cache is None else cache[i])
        h = self.decoder.norm(x)
        if self.config.mask_output_proj:
            return self.decoder.output_projection(h)
        return F.linear(h, self.embed.weight)  # tied, unmasked output projection

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, pad = self.encode(src)
        return self.decode(tgt_in, memory, pad)

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.decoder.layers]


def set_dropout(model: Seq2Seq, p: float) -> None:
    """Change the dropout of every layer (e.g. the fine-tune's own ``--dropout``)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    model.config = replace(model.config, dropout=p)
    for m in model.modules():
        if isinstance(m, (EncoderLayer, DecoderLayer, _FFN)):
            m.p = p


def label_smoothed_loss(logits: Tensor, target: Tensor, eps: float = 0.1) -> Tensor:
    """Mean label-smoothed cross-entropy over non-pad target tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=PAD, label_smoothing=eps)
