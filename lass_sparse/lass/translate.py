"""Batched beam search with a KV cache (greedy = beam 1), mixed-pair batches, and zero-shot mask
resolution."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..masks import MaskBank
from ..mt.direction import Direction
from ..nn import get_context
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


def default_limit(model_max_len: int, src_len: int) -> int:
    """Decoding steps :func:`beam_search` allows a batch whose padded source is ``src_len`` tokens
    long (EOS is forced at the last one): ``min(model_max_len - 1, 2 * src_len + 10)``."""
    return min(model_max_len - 1, 2 * src_len + 10)


def translate_limits(src_lens: Sequence[int], model_max_len: int,
                     batch_size: int = 64) -> list[int]:
    """The step limit :func:`translate` gives each of its sentences (``src_lens``: encoder input
    lengths): sentences are sorted by length and batched ``batch_size`` at a time, and a batch's
    limit follows its longest source. A server that batches the same sentences differently
    passes these as ``beam_search(max_len=[...])`` to decode exactly as ``translate`` does."""
    order = sorted(range(len(src_lens)), key=lambda i: src_lens[i])
    out = [0] * len(src_lens)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        lim = default_limit(model_max_len, max(src_lens[i] for i in chunk))
        for i in chunk:
            out[i] = lim
    return out


def _per_row(name: str, value: int | Sequence[int] | Tensor, rows: int) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.long).flatten()
    if t.numel() == 1:
        return t.expand(rows).clone()
    if t.numel() != rows:
        raise ValueError(f"beam_search: {name} must be an int or one value per source row "
                         f"({rows}), got {t.numel()} values")
    return t


@torch.no_grad()
def beam_search(model: Seq2Seq, src: Tensor, bos: int | Sequence[int] | Tensor, beam: int = 4,
                max_len: int | Sequence[int] | None = None, lenpen: float = 1.0,
                use_cache: bool = True, *, pairs: Sequence[str] | None = None,
                pair_ids: Tensor | None = None,
                on_done: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
    """Best hypothesis (token ids, without BOS/EOS) for each row of ``src [B, S]``.

    Scores are summed log-probs; finished hypotheses are ranked by ``score / len ** lenpen``.
    ``use_cache=False`` re-runs the decoder on the whole prefix each step (same result).

    Per row (an int applies to every row): ``bos`` (the target-language token that starts the
    decoder) and ``max_len`` (decoding steps; EOS is forced at the last; default
    :func:`default_limit` of the padded source length). A row's result depends only on its own
    source, ``bos`` and limit, not on the other rows of the batch; a finished row leaves the
    batch (its beams, cache and encoder states), so the steps left cost what the rows still
    decoding cost.

    Mixed-pair batches: ``pairs`` (mask names) and ``pair_ids [B]`` indexing them run every row
    under its own pair's mask, the encoder and each decoder step as one forward through the
    segmented kernels (the beams of a row share its pair); without them, whatever pair the
    caller made active is used.

    ``on_done(row, hypothesis)`` is called as soon as a row's result is final (a server answers
    that request without waiting for the rest of the batch).
    """
    model.eval()
    bsz, k = src.shape[0], beam
    dev = src.device
    if (pairs is None) != (pair_ids is None):
        raise ValueError("beam_search: pairs and pair_ids go together (pair_ids index pairs)")
    if pair_ids is not None and pair_ids.numel() != bsz:
        raise ValueError(f"beam_search: pair_ids must have one id per source row ({bsz}), got "
                         f"{pair_ids.numel()}")
    bos_rows = _per_row("bos", bos, bsz).to(dev).repeat_interleave(k)
    if max_len is None or (isinstance(max_len, int) and max_len == 0):
        max_len = default_limit(model.config.max_len, src.shape[1])
    limits = _per_row("max_len", max_len, bsz)
    if bool((limits < 1).any()) or int(limits.max()) > model.config.max_len:
        raise ValueError(f"beam_search: max_len must be in [1, {model.config.max_len}] (the "
                         f"model's max_len), got {limits.tolist()}")
    ctx = None if pairs is None else get_context(model)
    saved = None if ctx is None else ctx.state()
    try:
        if ctx is not None:
            ctx.set(list(pairs), pair_ids)
        memory, pad = model.encode(src)
        memory, pad = memory.repeat_interleave(k, 0), pad.repeat_interleave(k, 0)
        beam_ids = None if pair_ids is None else pair_ids.to(dev).repeat_interleave(k)
        if ctx is not None:  # one setting for the steps: its row grouping is reused
            ctx.set(list(pairs), beam_ids)
        return _search(model, memory, pad, bos_rows, limits, k, lenpen, use_cache,
                       lambda ids: ctx.set(list(pairs), ids) if ctx is not None else None,
                       beam_ids, on_done)
    finally:
        if ctx is not None:
            ctx.restore(saved)


def _search(model: Seq2Seq, memory: Tensor, pad: Tensor, bos_rows: Tensor, limits: Tensor,
            k: int, lenpen: float, use_cache: bool, set_pairs, beam_ids: Tensor | None,
            on_done: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
    """The steps of :func:`beam_search`. ``act`` holds the source rows still decoding; every
    per-row tensor (``[A * k, ...]`` or ``[A, ...]``) follows it."""
    bsz = limits.numel()
    dev = memory.device
    act = torch.arange(bsz)
    tokens = bos_rows.view(-1, 1).clone()
    scores = torch.zeros(bsz, k, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(bsz)]
    done = torch.zeros(bsz, dtype=torch.bool)
    cache = model.new_cache() if use_cache else None
    for t in range(int(limits.max())):
        n = act.numel()
        if use_cache:
            logits = model.decode(tokens[:, -1:], memory, pad, cache, start=t)[:, -1]
        else:
            logits = model.decode(tokens, memory, pad)[:, -1]
        lp = logits.float().log_softmax(-1)
        lp[:, PAD] = float("-inf")
        lp[torch.arange(n * k, device=dev), bos_rows] = float("-inf")
        last = limits[act].eq(t + 1)  # out of room: only EOS
        if bool(last.any()):
            rows = last.to(dev).repeat_interleave(k)
            eos_col = lp[rows, EOS].clone()
            lp[rows] = float("-inf")
            lp[rows, EOS] = eos_col
        vocab = lp.shape[-1]
        cand = (scores.view(-1, 1) + lp).view(n, k * vocab)
        top_s, top_i = cand.topk(2 * k, dim=1)
        origin, tok = top_i // vocab, top_i % vocab
        is_eos = tok.eq(EOS)
        # finished hypotheses: EOS among the first k candidates
        for a, j in (is_eos[:, :k] & top_s[:, :k].isfinite()).nonzero().tolist():
            b = int(act[a])
            if done[b]:
                continue
            hyp = tokens[a * k + origin[a, j], 1:].tolist()
            finished[b].append((float(top_s[a, j]) / (len(hyp) + 1) ** lenpen, hyp))
            if len(finished[b]) >= k:
                done[b] = True
        done[act[last]] = True  # a row's limit ends it
        keep = ~done[act]
        # continuing beams: the best k non-EOS candidates
        rank = torch.arange(2 * k, device=dev).expand(n, -1) + is_eos.long() * 2 * k
        pick = rank.argsort(dim=1)[:, :k]
        scores = top_s.gather(1, pick)
        if not bool(keep.all()):
            for a in (~keep).nonzero().flatten().tolist():
                b = int(act[a])
                if not finished[b]:  # nothing ended (no finite EOS): its best alive beam
                    finished[b].append((0.0, tokens[a * k + int(scores[a].argmax()), 1:]
                                        .tolist()))
                if on_done is not None:
                    on_done(b, max(finished[b], key=lambda x: x[0])[1])
        if not bool(keep.any()):
            break
        order = origin.gather(1, pick) + torch.arange(n, device=dev)[:, None] * k
        new_tok = tok.gather(1, pick)
        if not bool(keep.all()):  # finished rows leave the batch
            kd = keep.to(dev)
            scores, order, new_tok = scores[kd], order[kd], new_tok[kd]
            rows = kd.repeat_interleave(k)
            memory, pad, bos_rows = memory[rows], pad[rows], bos_rows[rows]
            act = act[keep]
            if beam_ids is not None:
                beam_ids = beam_ids[rows]
                set_pairs(beam_ids)
        order = order.view(-1)
        tokens = torch.cat([tokens.index_select(0, order), new_tok.view(-1, 1)], 1)
        if cache is not None:
            _reorder(cache, order)
    out = []
    for b in range(bsz):
        if not finished[b]:  # nothing ended: take the best alive beam
            a = int((act == b).nonzero()[0])
            finished[b].append((0.0, tokens[a * k + int(scores[a].argmax()), 1:].tolist()))
            if on_done is not None:
                on_done(b, finished[b][-1][1])
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
