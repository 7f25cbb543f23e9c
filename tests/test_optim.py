"""MaskedAdamW: off-mask entries bit-identical, masked ones equal torch AdamW, union, state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lass_sparse as ls
from lass_sparse import MaskBank
from lass_sparse.optim import MaskedAdamW


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 24), nn.LayerNorm(24), nn.Linear(24, 8))
    ls.convert(model)
    bank = MaskBank(
        {"0.weight": (24, 40), "2.weight": (8, 24)}, alpha=0.5)
    for p in ("en-de", "en-fr"):
        bank.add_pair(p, {n: torch.rand(s) < 0.5 for n, s in bank.shapes.items()})
    ls.attach(model, bank)
    return model, bank


def _train(model, opt, pairs, steps=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        pair = pairs[i % len(pairs)]
        x = torch.randn(6, 40, generator=g)
        with ls.active_pair(model, pair):
            model(x).pow(2).mean().backward()
        opt.note_pair(pair)
        opt.step()
        opt.zero_grad()


def test_off_mask_entries_unchanged_and_masked_entries_match_torch_adamw():
    model, bank = _setup()
    ref = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    opt = MaskedAdamW(model.parameters(), lr=1e-2).bind(model, bank)
    _train(model, opt, ["en-de"])
    # torch AdamW on the same masked forward: masked entries must agree
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ls.attach(ref, bank)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(6, 40, generator=g)
        with ls.active_pair(ref, "en-de"):
            ref(x).pow(2).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for name in bank.names:
        mask = ls.unpack_mask(bank.bits("en-de", name), bank.shapes[name][-1])
        p, p0, pr = model.get_parameter(name), before[name], ref.get_parameter(name)
        assert torch.equal(p[~mask], p0[~mask]), name
        st = opt.state[p]
        assert not st["exp_avg"][~mask].any() and not st["exp_avg_sq"][~mask].any()
        torch.testing.assert_close(p[mask], pr[mask], atol=1e-6, rtol=1e-5)
    # unmasked params (biases, norm) get plain AdamW
    torch.testing.assert_close(model[1].weight, ref[1].weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model[0].bias, ref[0].bias, atol=1e-6, rtol=1e-5)


def test_union_of_noted_pairs():
    model, bank = _setup()
    before = copy.deepcopy(model.state_dict())
    opt = MaskedAdamW(model.parameters(), lr=1e-2).bind(model, bank)
    for pair in ("en-de", "en-fr"):  # accumulate two pairs, one step
        with ls.active_pair(model, pair):
            model(torch.randn(4, 40)).sum().backward()
        opt.note_pair(pair)
    assert opt.pending_pairs == ["en-de", "en-fr"]
    opt.step()
    assert opt.pending_pairs == []
    union = bank.union(["en-de", "en-fr"])
    for name in bank.names:
        mask = ls.unpack_mask(union[name], bank.shapes[name][-1])
        p = model.get_parameter(name)
        assert torch.equal(p[~mask], before[name][~mask])
        assert (p[mask] != before[name][mask]).any()


def test_step_without_a_noted_pair_is_an_error():
    model, bank = _setup()
    opt = MaskedAdamW(model.parameters()).bind(model, bank)
    model(torch.randn(2, 40)).sum().backward()
    with pytest.raises(RuntimeError, match="no pair noted"):
        opt.step()
    with pytest.raises(KeyError, match="known pairs"):
        opt.note_pair("xx-yy")


def test_state_dict_round_trip_resumes_identically():
    model, bank = _setup()
    opt = MaskedAdamW(model.parameters(), lr=1e-2).bind(model, bank)
    _train(model, opt, ["en-de", "en-fr"], steps=3)
    model2 = copy.deepcopy(model)
    opt2 = MaskedAdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt2.bind(model2, bank)
    ls.attach(model2, bank)
    _train(model, opt, ["en-fr"], steps=2, seed=7)
    _train(model2, opt2, ["en-fr"], steps=2, seed=7)
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr"):
        MaskedAdamW([nn.Parameter(torch.zeros(2))], lr=-1)
    with pytest.raises(ValueError, match="betas"):
        MaskedAdamW([nn.Parameter(torch.zeros(2))], betas=(1.0, 0.9))


def test_step_reuses_the_union_and_device_copies_until_the_bank_changes(monkeypatch):
    """The union of a step's masks is computed once per pair set (not every step), recomputed
    after the bank changes; device copies of the bits are made once and reused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16))
    ls.convert(model)
    bank = MaskBank.from_model(model, 0.5, pair="a")
    opt = MaskedAdamW(model.parameters(), lr=1e-2).bind(model, bank)
    calls = []
    union = bank.union
    monkeypatch.setattr(bank, "union", lambda pairs: calls.append(tuple(pairs)) or union(pairs))

    def step(pair):
        with ls.active_pair(model, pair):
            model(torch.randn(4, 8)).sum().backward()
        opt.note_pair(pair)
        opt.step()
        opt.zero_grad()

    ls.attach(model, bank)
    for _ in range(3):
        step("a")
    assert calls == [("a",)]
    bank.add_pair("b", {n: torch.rand(s) < 0.5 for n, s in bank.shapes.items()})
    step("a")
    step("b")
    assert calls == [("a",), ("a",), ("b",)]
    masks = opt._union_cache[(("b",), bank.version)]
    pid = next(iter(masks))
    first = opt._on_device(masks, pid, torch.device("meta"))
    assert opt._on_device(masks, pid, torch.device("meta")) is first
    assert first.device.type == "meta" and first.shape == masks[pid].shape
