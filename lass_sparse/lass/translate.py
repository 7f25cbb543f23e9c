"""Batched beam search with a KV cache (greedy = beam 1), and zero-shot mask resolution."""

from __future__ import annotations

import torch
from torch import Tensor

from ..masks import MaskBank
from ..mt.direction import Direction
from .device import model_device
from .encoding import encode_source, encoder_lang, pad_batch
from .model import Seq2Seq
from .tokenizer import EOS, PAD, Tokenizer


def ensure_pair(bank: MaskBank, direction: str, pivot: str = "en") -> str:
    """Make ``direction`` usable: present in the bank, or (zero-shot X→Y) the merge of the encoder
    mask of X→pivot and the decoder mask of pivot→Y, added to the bank in memory."""
    if direction in bank:
        return direction
    src, tgt = Direction.parse(direction)
    a, b = f"{src}-{pivot}", f"{pivot}-{tgt}"
    if a in bank and b in bank:
        bank.add_pair(direction, bank.merge(a, b, encoder_prefix="encoder.",
                                            decoder_prefix="decoder."))
        return direction
    raise KeyError(f"no mask for {direction!r} and no {a!r} + {b!r} to merge for zero-shot; "
                   f"known pairs: {bank.pairs}")


def _reorder(cache: list[dict], order: Tensor) -> None:
    for layer in cache:
        for part in layer.values():
            for k in ("k", "v"):
                if k in part:
                    part[k] = part[k].index_select(0, order)


@torch.no_grad()
def beam_search(model: Seq2Seq, src: Tensor, bos: int, beam: int = 4, max_len: int | None = None,
                lenpen: float = 1.0, use_cache: bool = True) -> list[list[int]]:
    """Best hypothesis (token ids, without BOS/EOS) for each row of ``src [B, S]``.

    Scores are summed log-probs; finished hypotheses are ranked by ``score / len ** lenpen``.
    ``use_cache=False`` re-runs the decoder on the whole prefix each step (same result).
    """
    model.eval()
    bsz, k = src.shape[0], beam
    memory, pad = model.encode(src)
    memory, pad = memory.repeat_interleave(k, 0), pad.repeat_interleave(k, 0)
    limit = max_len or min(model.config.max_len - 1, 2 * src.shape[1] + 10)
    tokens = torch.full((bsz * k, 1), bos, dtype=torch.long, device=src.device)
    scores = torch.zeros(bsz, k, device=src.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(bsz)]
    done = torch.zeros(bsz, dtype=torch.bool)
    cache = model.new_cache() if use_cache else None
    for t in range(limit):
        if use_cache:
            logits = model.decode(tokens[:, -1:], memory, pad, cache, start=t)[:, -1]
        else:
            logits = model.decode(tokens, memory, pad)[:, -1]
        lp = logits.float().log_softmax(-1)
        lp[:, PAD] = float("-inf")
        lp[:, bos] = float("-inf")
        if t == limit - 1:  # out of room: only EOS
            eos_col = lp[:, EOS].clone()
            lp.fill_(float("-inf"))
            lp[:, EOS] = eos_col
        vocab = lp.shape[-1]
        cand = (scores.view(-1, 1) + lp).view(bsz, k * vocab)
        top_s, top_i = cand.topk(2 * k, dim=1)
        origin, tok = top_i // vocab, top_i % vocab
        is_eos = tok.eq(EOS)
        # finished hypotheses: EOS among the first k candidates
        for b, j in (is_eos[:, :k] & top_s[:, :k].isfinite()).nonzero().tolist():
            if done[b]:
                continue
            hyp = tokens[b * k + origin[b, j], 1:].tolist()
            finished[b].append((float(top_s[b, j]) / (len(hyp) + 1) ** lenpen, hyp))
            if len(finished[b]) >= k:
                done[b] = True
        if bool(done.all()):
            break
        # continuing beams: the best k non-EOS candidates
        rank = torch.arange(2 * k, device=src.device).expand(bsz, -1) + is_eos.long() * 2 * k
        pick = rank.argsort(dim=1)[:, :k]
        scores = top_s.gather(1, pick)
        scores[done.to(scores.device)] = float("-inf")
        order = (origin.gather(1, pick) + torch.arange(bsz, device=src.device)[:, None] * k)
        order = order.view(-1)
        tokens = torch.cat([tokens.index_select(0, order), tok.gather(1, pick).view(-1, 1)], 1)
        if cache is not None:
            _reorder(cache, order)
    out = []
    for b in range(bsz):
        if not finished[b]:  # nothing ended: take the best alive beam
            j = int(scores[b].argmax())
            finished[b].append((0.0, tokens[b * k + j, 1:].tolist()))
        out.append(max(finished[b], key=lambda x: x[0])[1])
    return out


def translate(model: Seq2Seq, tok: Tokenizer, texts: list[str], direction: str, *,
              beam: int = 4, batch_size: int = 64, lenpen: float = 1.0,
              use_cache: bool = True, langtok: str = "src") -> list[str]:
    """Translate ``texts`` along ``direction`` (the caller activates the pair's mask).
    ``langtok``: the encoder's language token, as the model was trained (the run's)."""
    if not texts:
        return []
    if beam < 1 or batch_size < 1:
        raise ValueError(f"beam and batch_size must be >= 1, got {beam}, {batch_size}")
    tgt = Direction.parse(direction).tgt
    lang = encoder_lang(direction, langtok)
    ids = tok.encode(texts)
    src = [encode_source(tok, s, lang, model.config.max_len) for s in ids]
    order = sorted(range(len(src)), key=lambda i: len(src[i]))
    out: list[str] = [""] * len(src)
    dev = model_device(model)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        hyps = beam_search(model, pad_batch([src[i] for i in chunk]).to(dev), tok.lang_id(tgt),
                           beam, lenpen=lenpen, use_cache=use_cache)
        for i, h in zip(chunk, tok.decode(hyps)):
            out[i] = h
    return out
