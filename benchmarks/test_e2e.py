"""End to end: one LaSS joint-training step (masked forward, masked dW, masked AdamW) and one
translate batch vs the same model dense, tiny and base configs."""

from __future__ import annotations

import pytest
import torch
from common import TensorMemory, tag, timed

import lass_sparse as ls
from lass_sparse.lass.model import Seq2Seq, label_smoothed_loss, make_config
from lass_sparse.lass.translate import beam_search
from lass_sparse.optim import MaskedAdamW

CONFIGS = {"tiny": dict(), "base": dict()}


def _model(cfg_name: str, smoke: bool, device: str):
    over = dict(d_model=32, heads=2, ffn=64, enc_layers=1, dec_layers=1) if smoke else {}
    torch.manual_seed(0)
    return Seq2Seq(make_config(cfg_name, 1000 if smoke else 8000, dropout=0.0, **over)).to(device)


def _batch(vocab: int, b: int, t: int, device: str):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(5, vocab, (b, t), generator=g)
    tgt = torch.randint(5, vocab, (b, t + 1), generator=g)
    return src.to(device), tgt[:, :-1].to(device), tgt[:, 1:].to(device)


def _batch_size(device: str, smoke: bool) -> int:
    return 8 if smoke else 256 if device == "cuda" else 32


@pytest.mark.parametrize("impl", ["ours", "dense", "naive"])
@pytest.mark.parametrize("config", ["tiny", "base"])
def test_joint_step(benchmark, impl, config, device, is_smoke):
    """ours: packed masks fused (masked dW, masked AdamW); dense: no masks; naive: the original
    LaSS way — a bool mask per weight, ``W * mask`` built every step (autograd keeps it)."""
    model = _model(config, is_smoke, device)
    src, tgt_in, tgt_out = _batch(model.config.vocab_size, _batch_size(device, is_smoke), 24,
                                  device)
    opt = MaskedAdamW(model.parameters(), lr=1e-4)
    bank = ls.MaskBank.from_model(model, 0.5, pair="en-de")
    masks = {n: ls.unpack_mask(bank.bits("en-de", n), s[-1]) for n, s in bank.shapes.items()}
    if impl == "ours":
        ls.attach(model, bank)
        opt.bind(model, bank)
    else:
        opt.set_masks({model.get_parameter(n): bank.bits("en-de", n) for n in bank.names}
                      if impl == "naive" else None)
    tag(benchmark, "joint_step", impl, device=device, config=config,
        tokens=int(src.numel() + tgt_in.numel()))

    def forward():
        if impl == "naive":
            eff = {n: p * masks[n] if n in masks else p for n, p in model.named_parameters()}
            return torch.func.functional_call(model, eff, (src, tgt_in))
        return model(src, tgt_in)

    def step():
        if impl == "ours":
            with ls.active_pair(model, "en-de"):
                label_smoothed_loss(forward(), tgt_out).backward()
            opt.note_pair("en-de")
        else:
            label_smoothed_loss(forward(), tgt_out).backward()
        opt.step()
        opt.zero_grad()

    step()  # optimizer state exists before measuring memory
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
        benchmark.extra_info["peak_step_MB"] = f"{peak / 2**20:.1f}"
    else:
        with TensorMemory() as mem:
            step()
        benchmark.extra_info["peak_tracked_MB"] = f"{mem.peak / 2**20:.1f}"
    mask_bytes = {"ours": sum(b.nbytes for b in bank["en-de"].values()),
                  "naive": sum(m.nbytes for m in masks.values()), "dense": 0}[impl]
    benchmark.extra_info["mask_MB_per_pair"] = f"{mask_bytes / 2**20:.2f}"
    timed(benchmark, device, step)


@pytest.mark.parametrize("impl", ["ours", "dense"])
@pytest.mark.parametrize("config", ["tiny", "base"])
def test_translate_batch(benchmark, impl, config, device, is_smoke):
    model = _model(config, is_smoke, device).eval()
    src, _, _ = _batch(model.config.vocab_size, _batch_size(device, is_smoke), 20, device)
    tag(benchmark, "translate_batch", impl, device=device, config=config, batch=src.shape[0],
        beam=4)
    if impl == "ours":
        ls.attach(model, ls.MaskBank.from_model(model, 0.5, pair="en-de"))
        ls.set_active_pair(model, "en-de")
    out = timed(benchmark, device,
                lambda: beam_search(model, src, 4, beam=4, max_len=8 if is_smoke else 24))
    assert len(out) == src.shape[0]
