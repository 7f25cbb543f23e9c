"""The training loop shared by every stage: base, fine-tune, joint (masked), extend.

One batch = one direction. Masked stages run the forward with the batch's mask (active pair)
and step :class:`~lass_sparse.optim.MaskedAdamW` on that mask, so only the direction's
sub-network and the shared unmasked parameters change. Checkpoints every ``ckpt_every`` steps;
a rerun resumes from the last one bit-identically (same batches, RNG and optimizer state).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..distributed import PairGroupedSampler
from ..masks import MaskBank
from ..nn import active_pair, attach
from ..optim import MaskedAdamW
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .data import Corpus, parse_direction
from .model import label_smoothed_loss
from .tokenizer import EOS, PAD, Tokenizer


@dataclass
class TrainConfig:
    stage: str
    directions: list[str]
    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    temperature: float = 5.0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    amp: str = "none"  # "bf16": CPU/GPU autocast (fp32 master weights and optimizer state)
    seed: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    direction: str
    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor

    @property
    def tokens(self) -> int:
        return int(self.src.ne(PAD).sum() + self.tgt_out.ne(PAD).sum())


def pad_batch(seqs: list[list[int]]) -> Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def encode_source(tok: Tokenizer, ids: list[int], tgt_lang: str, max_len: int) -> list[int]:
    """Encoder input: target-language token, the sentence, EOS."""
    return [tok.lang_id(tgt_lang)] + ids[: max_len - 2] + [EOS]


class Encoded:
    """Tokenised training examples of several directions, indexed by direction."""

    def __init__(self, corpus: Corpus, tok: Tokenizer, directions: list[str], max_len: int):
        self.src: list[list[int]] = []
        self.tgt: list[list[int]] = []
        self.index: dict[str, range] = {}
        for d in directions:
            _, t = parse_direction(d)
            ex = corpus.examples(d)
            start = len(self.src)
            src_ids = tok.encode([a for a, _ in ex])
            tgt_ids = tok.encode([b for _, b in ex])
            lang = tok.lang_id(t)
            for a, b in zip(src_ids, tgt_ids):
                self.src.append(encode_source(tok, a, t, max_len))
                self.tgt.append([lang] + b[: max_len - 2] + [EOS])
            self.index[d] = range(start, len(self.src))

    def batch(self, direction: str, idx: list[int]) -> Batch:
        tgt = pad_batch([self.tgt[i] for i in idx])
        return Batch(direction, pad_batch([self.src[i] for i in idx]), tgt[:, :-1], tgt[:, 1:])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then inverse square root decay (Vaswani et al.)."""
    s = max(step, 1)
    w = max(cfg.warmup, 1)
    return cfg.lr * min(s / w, math.sqrt(w / s))


def run_stage(
    out_dir: str,
    model: nn.Module,
    data: Encoded,
    cfg: TrainConfig,
    *,
    bank: MaskBank | None = None,
    update_masks: dict[nn.Parameter, Tensor | None] | None = None,
    update_bank: MaskBank | None = None,
    params: list[nn.Parameter] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train ``model`` for ``cfg.steps`` steps (resuming from ``out_dir/ckpt`` if present).

    ``bank``: masked training — each batch runs with its direction's mask and the optimizer
    updates the union of the masks of the step's batches. ``update_masks`` / ``params``: restrict
    the update explicitly; ``update_bank``: the optimizer masks each step with this bank's masks of
    the step's directions instead of ``bank``'s (``extend --strict``). Returns a summary (steps,
    tokens, seconds, loss).
    """
    missing = [d for d in cfg.directions if d not in data.index]
    if missing:
        raise KeyError(f"no training data for directions {missing}")
    if bank is not None:
        for d in cfg.directions:
            bank._check_pair(d)
    ckpt = os.path.join(out_dir, "ckpt")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    opt = MaskedAdamW(params if params is not None else model.parameters(), lr=cfg.lr,
                      betas=(0.9, 0.98), eps=1e-8, weight_decay=cfg.weight_decay)
    if bank is not None:
        attach(model, bank)
        opt.bind(model, bank if update_bank is None else update_bank)
    if update_masks is not None:
        opt.set_masks(update_masks)
    step = 0
    if resume and has_checkpoint(ckpt):
        state = load_checkpoint(ckpt, model, opt, restore_rng=True)
        step = int(state["step"])
    sampler = PairGroupedSampler({d: data.index[d] for d in cfg.directions}, cfg.batch_size,
                                 temperature=cfg.temperature, seed=cfg.seed, num_replicas=1,
                                 rank=0)
    per_epoch = len(sampler)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    log_path = os.path.join(out_dir, "log.jsonl")
    model.train()
    epoch, batches = -1, []
    tokens_total, loss_sum, loss_n, t_start = 0, 0.0, 0, time.perf_counter()
    bar = _progress(progress, cfg, step)
    with open(log_path, "a") as log:
        while step < cfg.steps:
            e, i = divmod(step, per_epoch)
            if e != epoch:
                sampler.set_epoch(e)
                epoch, batches = e, list(sampler.batches())
            direction, idx = batches[i]
            b = data.batch(direction, idx)
            for g in opt.param_groups:
                g["lr"] = lr_at(step + 1, cfg)
            t0 = time.perf_counter()
            ctx = active_pair(model, direction) if bank is not None else contextlib.nullcontext()
            with ctx, _autocast(cfg.amp, b.src.device):
                loss = label_smoothed_loss(model(b.src, b.tgt_in), b.tgt_out,
                                           cfg.label_smoothing)
                loss.backward()
            if cfg.clip_norm:
                nn.utils.clip_grad_norm_(trainable, cfg.clip_norm)
            if bank is not None and update_masks is None:
                opt.note_pair(direction)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            tokens_total += b.tokens
            loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", tok_s=f"{b.tokens / dt:.0f}",
                                pair=direction)
            if step % cfg.log_every == 0 or step == cfg.steps:
                rec = {"stage": cfg.stage, "step": step, "loss": float(loss.detach()),
                       "lr": lr_at(step, cfg), "tokens_per_s": b.tokens / dt, "pair": direction}
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt, model, opt, {"step": step, "config": cfg.to_dict()})
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t_start
    return {"stage": cfg.stage, "steps": step, "tokens": tokens_total, "seconds": secs,
            "tokens_per_s": tokens_total / secs if secs > 0 else 0.0,
            "mean_loss": loss_sum / loss_n if loss_n else None}


def _autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    if amp != "bf16":
        raise ValueError(f"amp must be 'none' or 'bf16', got {amp!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _progress(enabled: bool, cfg: TrainConfig, initial: int):
    if not enabled or initial >= cfg.steps:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=initial, desc=cfg.stage, unit="step",
                dynamic_ncols=True, leave=False)


def plot_log(log_path: str, out_png: str) -> str:
    """Loss curve(s) of a ``log.jsonl`` (one line per stage) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, tuple[list, list]] = {}
    with open(log_path) as f:
        for line in f:
            r = json.loads(line)
            xs, ys = curves.setdefault(r["stage"], ([], []))
            xs.append(r["step"])
            ys.append(r["loss"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for stage, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=stage)
    ax.set_xlabel("step")
    ax.set_ylabel("label-smoothed CE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
