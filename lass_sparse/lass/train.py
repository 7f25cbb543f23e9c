"""The training loop shared by every stage: base, fine-tune, joint (masked), extend.

One batch = one direction. Masked stages run the forward with the batch's mask (active pair)
and step :class:`~lass_sparse.optim.MaskedAdamW` on that mask, so only the direction's
sub-network and the shared unmasked parameters change. Checkpoints every ``ckpt_every`` steps;
a rerun resumes from the last one bit-identically (same batches, RNG and optimizer state).

With ``validate_every`` the stage computes the validation loss of its directions (each under its
own mask) every K steps, keeps the best weights in ``<stage>/best`` next to the last checkpoint
``<stage>/ckpt``, and with ``patience`` N stops after N validations without improvement (as
fairseq's ``--patience``); ``steps`` is then an upper bound.
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

from ..distributed import PairGroupedSampler, gather_pairs, world_and_rank
from ..masks import MaskBank
from ..mt.corpus import Corpus
from ..mt.direction import Direction
from ..nn import active_pair, attach
from ..optim import MaskedAdamW
from .checkpoint import has_checkpoint, load_checkpoint, load_optimizer_state, save_checkpoint
from .device import model_device, resolve_amp
from .encoding import LANGTOKS, encode_source, encoder_lang, pad_batch  # noqa: F401 (re-exported)
from .model import label_smoothed_loss, set_dropout
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
    amp: str = "none"  # bf16 / fp16 (GPU, grad scaler) autocast, fp32 master weights; auto:
    # bf16 on a GPU, none on a CPU
    seed: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    max_tokens: int | None = None  # token batches (batch_size then caps the rows)
    validate_every: int = 0  # 0: no validation
    patience: int = 0  # validations without improvement before stopping; 0: never stop early
    dropout: float | None = None  # None: the model's own
    accum: int = 1  # batches accumulated per optimizer step (fairseq --update-freq)
    fsdp: bool = False  # under torchrun: FSDP2 (row-sharded parameters) instead of DDP
    compile: bool = False  # torch.compile the training forward (one graph serves every pair)
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

    def to(self, device: torch.device) -> Batch:
        if self.src.device == device:
            return self
        return Batch(self.direction, *(t.to(device, non_blocking=True)
                                       for t in (self.src, self.tgt_in, self.tgt_out)))


class Encoded:
    """Tokenised examples of several directions, indexed by direction: the training data, or
    with ``pairs={direction: [(source, target)]}`` any other rows (validation)."""

    def __init__(self, corpus: Corpus | None, tok: Tokenizer, directions: list[str],
                 max_len: int, langtok: str = "src",
                 pairs: dict[str, list[tuple[str, str]]] | None = None):
        self.src: list[list[int]] = []
        self.tgt: list[list[int]] = []
        self.index: dict[str, range] = {}
        for d in directions:
            t = Direction.parse(d).tgt
            ex = pairs[d] if pairs is not None else corpus.examples(d)
            start = len(self.src)
            src_ids = tok.encode([a for a, _ in ex])
            tgt_ids = tok.encode([b for _, b in ex])
            lang, enc_lang = tok.lang_id(t), encoder_lang(d, langtok)
            for a, b in zip(src_ids, tgt_ids):
                self.src.append(encode_source(tok, a, enc_lang, max_len))
                self.tgt.append([lang] + b[: max_len - 2] + [EOS])
            self.index[d] = range(start, len(self.src))

    def lengths(self) -> list[int]:
        """Tokens of each example: the longer of source and target (for token batches)."""
        return [max(len(a), len(b)) for a, b in zip(self.src, self.tgt)]

    def batch(self, direction: str, idx: list[int]) -> Batch:
        tgt = pad_batch([self.tgt[i] for i in idx])
        return Batch(direction, pad_batch([self.src[i] for i in idx]), tgt[:, :-1], tgt[:, 1:])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then inverse square root decay (Vaswani et al.)."""
    s = max(step, 1)
    w = max(cfg.warmup, 1)
    return cfg.lr * min(s / w, math.sqrt(w / s))


@dataclass(frozen=True)
class UpdatePolicy:
    """What a training stage runs with and may change.

    ``UpdatePolicy()``: dense, every parameter. ``bank``: masked training — each batch runs with
    its direction's mask and the optimizer updates the union of the masks of the step's batches
    (LaSS joint training). ``update_bank``: the optimizer masks each step with this bank's masks
    of the step's directions instead (``extend --strict``: outside every old pair's mask).
    ``params``: only these parameters are trained (the others frozen)."""

    bank: MaskBank | None = None
    update_bank: MaskBank | None = None
    params: tuple[nn.Parameter, ...] | None = None

    def __post_init__(self) -> None:
        if self.update_bank is not None and self.bank is None:
            raise ValueError("UpdatePolicy: update_bank needs the bank the batches run with")

    def optimizer_bank(self) -> MaskBank | None:
        return self.bank if self.update_bank is None else self.update_bank


def run_stage(
    out_dir: str,
    model: nn.Module,
    data: Encoded,
    cfg: TrainConfig,
    *,
    policy: UpdatePolicy | None = None,
    valid: Encoded | None = None,
    resume: bool = True,
    progress: bool = True,
    distributed: bool = True,
) -> dict:
    """Train ``model`` for up to ``cfg.steps`` steps (resuming from ``out_dir/ckpt`` if present).

    ``policy``: what runs masked and what the optimizer may change (:class:`UpdatePolicy`;
    default dense). ``valid``: validation rows
    of the stage's directions (needed by ``cfg.validate_every``). Returns a summary (steps,
    tokens, seconds, loss, best validation loss and step, whether it stopped early).

    Under ``torchrun`` (an initialised process group, ``distributed=True``) the model runs in
    DDP: rank r takes global batches r, r + W, ... of one seed-determined sequence, gradients are
    averaged, the optimizer updates the union of every rank's masks, and rank 0 writes the
    checkpoints, logs and progress bar. ``cfg.accum`` = A accumulates A consecutive batches per
    step, so W ranks with A = 1 and one process with A = W take the same steps. ``cfg.fsdp``:
    FSDP2 instead of DDP (each layer and the root ``fully_shard``-ed, parameters and optimizer
    state row-sharded, masks sliced to match); checkpoints are gathered to full tensors, so they
    load anywhere.
    """
    return _StageRun(out_dir, model, data, cfg, policy or UpdatePolicy(), valid, resume,
                     progress, distributed).run()


class _StageRun:
    """The state of one training stage: set up (resume, shard, optimizer, sampler, DDP), then
    :meth:`step` / :meth:`validate` / :meth:`save` until the cap or the stopping rule."""

    def __init__(self, out_dir: str, model: nn.Module, data: Encoded, cfg: TrainConfig,
                 policy: UpdatePolicy, valid: Encoded | None, resume: bool, progress: bool,
                 distributed: bool) -> None:
        self.model, self.data, self.cfg, self.valid = model, data, cfg, valid
        self.bank = bank = policy.bank
        self._check(distributed)
        self.world, self.rank = world_and_rank() if distributed else (1, 0)
        self.lead = self.rank == 0  # writes checkpoints, logs, the progress bar
        self.ckpt, self.best_dir = os.path.join(out_dir, "ckpt"), os.path.join(out_dir, "best")
        self.log_path = os.path.join(out_dir, "log.jsonl")
        os.makedirs(out_dir, exist_ok=True)
        self.dev = dev = model_device(model)  # batches follow the model (the caller places it)
        self.amp = resolve_amp(cfg.amp, dev)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        torch.manual_seed(cfg.seed)
        if cfg.dropout is not None:
            set_dropout(model, cfg.dropout)
        if bank is not None:
            attach(model, bank)
        self.step_no = 0
        self.es = {"best": None, "best_step": None, "bad": 0, "stopped": False}
        self.sharded = self.world > 1 and cfg.fsdp
        resuming = resume and has_checkpoint(self.ckpt)
        if resuming:  # weights first: FSDP shards the loaded model
            state = load_checkpoint(self.ckpt, model, None, restore_rng=True)
            self.step_no = int(state["step"])
            self.es.update(state.get("valid", {}))
        if self.sharded:
            _fsdp_shard(model)
        self.opt = MaskedAdamW(policy.params if policy.params is not None else model.parameters(),
                               lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
                               weight_decay=cfg.weight_decay)
        if bank is not None:
            self.opt.bind(model, policy.optimizer_bank())
        if resuming and (osd := load_optimizer_state(self.ckpt)) is not None:
            self.opt.load_state_dict(_local_optim_state(self.opt, osd))  # rows when sharded
        self.slots = self.world * cfg.accum  # global batches per optimizer step
        self.sampler = PairGroupedSampler(
            {d: data.index[d] for d in cfg.directions}, cfg.batch_size,
            temperature=cfg.temperature, seed=cfg.seed, num_replicas=self.slots, rank=0,
            max_tokens=cfg.max_tokens, lengths=data.lengths() if cfg.max_tokens else None)
        self.per_epoch = len(self.sampler)
        self.net = model
        if self.world > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[dev.index]
                                               if dev.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.trainable = [p for g in self.opt.param_groups for p in g["params"]]
        self.epoch, self.batches = -1, []
        self.tokens_total, self.loss_sum, self.loss_n = 0, 0.0, 0
        self.t_start = time.perf_counter()
        # the log interval: its start, tokens, seconds spent validating / saving (not training)
        self._log_t0, self._log_tokens, self._log_other_s = self.t_start, 0, 0.0
        self.bar = None if self.es["stopped"] else _progress(progress and self.lead, cfg,
                                                             self.step_no)

    def _check(self, distributed: bool) -> None:
        cfg, bank = self.cfg, self.bank
        missing = [d for d in cfg.directions if d not in self.data.index]
        if missing:
            raise KeyError(f"no training data for directions {missing}")
        if bank is not None:
            for d in cfg.directions:
                bank._check_pair(d)
        if cfg.validate_every < 0 or cfg.patience < 0:
            raise ValueError("validate_every and patience must be >= 0")
        if cfg.accum < 1:
            raise ValueError(f"accum must be >= 1, got {cfg.accum}")
        if cfg.compile and cfg.fsdp and distributed:
            raise ValueError("compile: not supported with fsdp (DDP or one process only)")
        if cfg.validate_every and (self.valid is None or any(
                d not in self.valid.index for d in cfg.directions)):
            raise ValueError(f"{cfg.stage}: validate_every needs validation rows for every "
                             "direction")

    @property
    def done(self) -> bool:
        return self.step_no >= self.cfg.steps or self.es["stopped"]

    def state(self) -> dict:
        return {"step": self.step_no, "config": self.cfg.to_dict(), "valid": dict(self.es)}

    def save(self, folder: str, optimizer, st: dict) -> None:
        """Rank 0 writes; sharded, every rank first helps gather the full tensors."""
        if self.sharded:
            msd, osd = _full_state(self.model, optimizer)
            if self.lead:
                save_checkpoint(folder, None, None, st, model_state=msd, optim_state=osd)
        elif self.lead:
            save_checkpoint(folder, self.model, optimizer, st)

    def _micro(self) -> list:
        """This rank's batches of the next optimizer step (a new epoch's sequence as needed)."""
        e, i = divmod(self.step_no, self.per_epoch)
        if e != self.epoch:
            self.sampler.set_epoch(e)
            self.epoch, self.batches = e, self.sampler.global_sequence()
        lo = i * self.slots + self.rank * self.cfg.accum
        return self.batches[lo:lo + self.cfg.accum]

    def step(self) -> tuple[Tensor, int, float, str]:
        """One optimizer step; returns (loss, tokens, seconds, last direction)."""
        cfg, opt, bank = self.cfg, self.opt, self.bank
        micro = self._micro()
        for g in opt.param_groups:
            g["lr"] = lr_at(self.step_no + 1, cfg)
        t0 = time.perf_counter()
        tokens, losses = 0, []
        for j, (direction, idx) in enumerate(micro):
            # dropout's RNG per global batch: ranks draw different masks, and W ranks draw
            # exactly what one process with --accum W draws
            torch.manual_seed(_batch_seed(cfg.seed, self.step_no * self.slots
                                          + self.rank * cfg.accum + j))
            b = self.data.batch(direction, idx)
            tokens += b.tokens  # counted on the host: on the device, a sync every step
            b = b.to(self.dev)
            ctx = (active_pair(self.model, direction) if bank is not None
                   else contextlib.nullcontext())
            last = j == len(micro) - 1
            if self.sharded:
                self.model.set_requires_gradient_sync(last)
            sync = (self.net.no_sync() if self.world > 1 and not self.sharded and not last
                    else contextlib.nullcontext())
            with ctx, sync, _autocast(self.amp, self.dev):
                loss = label_smoothed_loss(self.net(b.src, b.tgt_in), b.tgt_out,
                                           cfg.label_smoothing)
                scaled = loss / len(micro)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            losses.append(loss.detach())
        loss = torch.stack(losses).mean()
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if cfg.clip_norm:
            nn.utils.clip_grad_norm_(self.trainable, cfg.clip_norm)
        if bank is not None:
            # every rank's pairs under DDP; a job alone inside a process group (experiment jobs
            # side by side) must not join a collective
            pairs = [d for d, _ in micro]
            opt.note_pair(*(gather_pairs(*pairs) if self.world > 1 else dict.fromkeys(pairs)))
        if self.scaler is not None:
            self.scaler.step(opt)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.step_no += 1
        return loss, tokens, time.perf_counter() - t0, micro[-1][0]

    def validate(self, log) -> None:
        """Validation loss; keeps the best weights, counts validations without improvement."""
        cfg, es = self.cfg, self.es
        v = validation_loss(self.model, self.valid, cfg.directions, bank=self.bank, amp=self.amp,
                            label_smoothing=cfg.label_smoothing)
        if es["best"] is None or v["loss"] < es["best"]:
            es.update(best=v["loss"], best_step=self.step_no, bad=0)
            self.save(self.best_dir, None, {"step": self.step_no, "valid": v,
                                            "config": cfg.to_dict()})
        else:
            es["bad"] += 1
            es["stopped"] = bool(cfg.patience) and es["bad"] >= cfg.patience
        log.write(json.dumps({"stage": cfg.stage, "step": self.step_no, "valid_loss": v["loss"],
                              "valid_nll": v["nll"], "best": es["best"],
                              "stopped": es["stopped"]}) + "\n")
        log.flush()

    def _report(self, log, loss: Tensor, tokens: int, dt: float, direction: str) -> None:
        """Count the step; at log steps (every ``log_every`` and the last) read the loss and
        write the log line and the progress bar's numbers. Only there is a value read back from
        the device: a read every step would make the host wait for each step's kernels before it
        queues the next step's (no overlap on a GPU)."""
        cfg, step = self.cfg, self.step_no
        self.tokens_total += tokens
        self._log_tokens += tokens
        self.loss_sum = self.loss_sum + loss.detach()  # a device tensor from the first step on
        self.loss_n += 1
        if self.bar is not None:
            self.bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            value = float(loss.detach())  # waits for the device: the interval below is real time
            now = time.perf_counter()
            tok_s = self._log_tokens / max(now - self._log_t0 - self._log_other_s, 1e-9)
            self._log_t0, self._log_tokens, self._log_other_s = now, 0, 0.0
            if self.bar is not None:
                post = {"loss": f"{value:.3f}", "tok_s": f"{tok_s:.0f}", "pair": direction}
                if self.es["best"] is not None:
                    post["valid_best"] = f"{self.es['best']:.3f}"
                self.bar.set_postfix(post)
            log.write(json.dumps({"stage": cfg.stage, "step": step, "loss": value,
                                  "lr": lr_at(step, cfg), "tokens_per_s": tok_s,
                                  "pair": direction}) + "\n")
            log.flush()

    def _env(self, log) -> None:
        """Which device and kernels this run used (one log line per start)."""
        rec = _env_record(self.cfg.stage, self.step_no, self.dev, self.amp, self.world,
                          self.cfg.accum)
        rec["sharding"] = "fsdp2" if self.sharded else "ddp" if self.world > 1 else "none"
        rec["compile"] = self.cfg.compile
        if self.sharded:
            rec["sharded_params"] = sum(_is_dtensor(p) for p in self.model.parameters())
        log.write(json.dumps(rec) + "\n")
        log.flush()

    def run(self) -> dict:
        cfg = self.cfg
        self.model.train()
        with open(self.log_path, "a") if self.lead else contextlib.nullcontext(_NullLog()) as log:
            if not self.done:
                self._env(log)
            while not self.done:
                self._report(log, *self.step())
                step = self.step_no
                t0 = time.perf_counter()
                if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.steps):
                    self.validate(log)
                if step % cfg.ckpt_every == 0 or step == cfg.steps or self.es["stopped"]:
                    self.save(self.ckpt, self.opt, self.state())
                self._log_other_s += time.perf_counter() - t0
        if self.bar is not None:
            self.bar.close()
        if self.world > 1:
            torch.distributed.barrier()  # rank 0's last checkpoint is on disk for every rank
        secs = time.perf_counter() - self.t_start
        es = self.es
        return {"stage": cfg.stage, "steps": self.step_no, "tokens": self.tokens_total,
                "seconds": secs,
                "tokens_per_s": self.tokens_total / secs if secs > 0 else 0.0,
                "mean_loss": float(self.loss_sum) / self.loss_n if self.loss_n else None,
                "best_valid_loss": es["best"], "best_step": es["best_step"],
                "stopped_early": es["stopped"]}


@torch.no_grad()
def validation_loss(model: nn.Module, data: Encoded, directions: list[str], *,
                    bank: MaskBank | None = None, amp: str = "none", batch_size: int = 64,
                    label_smoothing: float = 0.1) -> dict:
    """Token-weighted label-smoothed CE (``loss``, the early-stopping metric, as fairseq's) and
    NLL over the rows of ``directions``, each under its own mask when ``bank`` is given; also
    per direction (``by_direction``). Dropout off; the model's mode is restored."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    amp = resolve_amp(amp, dev)
    tot = {"loss": 0.0, "nll": 0.0, "tokens": 0}
    by_dir = {}
    try:
        for d in directions:
            idx = list(data.index[d])
            s = {"loss": 0.0, "nll": 0.0, "tokens": 0}
            ctx = active_pair(model, d) if bank is not None else contextlib.nullcontext()
            with ctx:
                for i in range(0, len(idx), batch_size):
                    b = data.batch(d, idx[i:i + batch_size]).to(dev)
                    with _autocast(amp, dev):
                        logits = model(b.src, b.tgt_in)
                    n = int(b.tgt_out.ne(PAD).sum())
                    s["loss"] += float(label_smoothed_loss(logits, b.tgt_out,
                                                           label_smoothing)) * n
                    s["nll"] += float(label_smoothed_loss(logits, b.tgt_out, 0.0)) * n
                    s["tokens"] += n
            by_dir[d] = s["loss"] / max(s["tokens"], 1)
            for k in tot:
                tot[k] += s[k]
    finally:
        model.train(was_training)
    n = max(tot["tokens"], 1)
    return {"loss": tot["loss"] / n, "nll": tot["nll"] / n, "tokens": tot["tokens"],
            "by_direction": by_dir}


def _autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast(device.type,
                          dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _batch_seed(seed: int, global_batch: int) -> int:
    return (seed * 1_000_003 + global_batch * 7_919 + 17) % (2**63 - 1)


def _fsdp_shard(model: nn.Module) -> None:
    """FSDP2: each encoder/decoder layer, then the root (embeddings, norms, output head)."""
    from torch.distributed.fsdp import fully_shard

    for stack in (model.encoder, model.decoder):
        for layer in stack.layers:
            fully_shard(layer)
    fully_shard(model)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full_state(model: nn.Module, opt) -> tuple[dict, dict | None]:
    """Full model and optimizer state dicts of a sharded model (a collective: every rank)."""
    from torch.distributed.tensor import DTensor

    msd = {k: v.full_tensor() if _is_dtensor(v) else v for k, v in model.state_dict().items()}
    if opt is None:
        return msd, None
    params = [p for g in opt.param_groups for p in g["params"]]
    osd = opt.state_dict()
    state = {}
    for idx, st in osd["state"].items():
        p = params[idx]
        state[idx] = {k: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape,
                                            stride=p.stride(), run_check=False).full_tensor()
                      if _is_dtensor(p) and torch.is_tensor(v) and v.dim() else v
                      for k, v in st.items()}
    return msd, {"state": state, "param_groups": osd["param_groups"]}


def _local_optim_state(opt, osd: dict) -> dict:
    """A full optimizer state dict cut to this rank's rows of each sharded parameter."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for idx, st in osd["state"].items():
        p = params[int(idx)]
        if not _is_dtensor(p):
            state[idx] = st
            continue
        shape, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        state[idx] = {k: v[off[0]:off[0] + shape[0]] if torch.is_tensor(v) and v.dim() else v
                      for k, v in st.items()}
    return {"state": state, "param_groups": osd["param_groups"]}


class _NullLog:
    def write(self, _s: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _env_record(stage: str, step: int, dev: torch.device, amp: str, world: int = 1,
                accum: int = 1) -> dict:
    """A log line saying where a stage (re)started: device, autocast, active kernels, ranks."""
    from .. import backends

    rec = {"stage": stage, "step": step, "event": "start", "device": str(dev), "amp": amp,
           "world_size": world, "accum": accum, "torch": torch.__version__,
           "backends": sorted(n for n, r in backends().items() if r["active"])}
    if dev.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(dev)
    return rec


def _progress(enabled: bool, cfg: TrainConfig, initial: int):
    if not enabled or initial >= cfg.steps:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=initial, desc=cfg.stage, unit="step",
                dynamic_ncols=True, leave=False)


def plot_log(log_path: str, out_png: str) -> str:
    """Loss curve(s) of a ``log.jsonl`` (one line per stage, validation curves marked) as a
    PNG, written atomically."""
    from .plots import _plt, _save

    plt = _plt()
    curves: dict[str, tuple[list, list]] = {}
    with open(log_path) as f:
        for line in f:
            r = json.loads(line)
            if "loss" not in r and "valid_loss" not in r:
                continue  # e.g. the "start" record (device, kernels)
            key = "loss" if "loss" in r else "valid_loss"
            label = r["stage"] if key == "loss" else f"{r['stage']} (validation)"
            xs, ys = curves.setdefault(label, ([], []))
            xs.append(r["step"])
            ys.append(r[key])
    fig, ax = plt.subplots(figsize=(6, 4))
    for stage, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=stage, marker="o" if stage.endswith("(validation)") else None)
    ax.set_xlabel("step")
    ax.set_ylabel("label-smoothed CE")
    ax.legend()
    fig.tight_layout()
    return _save(plt, fig, out_png)
