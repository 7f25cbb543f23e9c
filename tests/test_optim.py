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


# ------------------------------------------------------------------------ capturable=True


def _pair_run(capturable: bool, steps=5, lr=1e-2):
    model, bank = _setup()
    opt = MaskedAdamW(model.parameters(), lr=lr, capturable=capturable).bind(model, bank)
    _train(model, opt, ["en-de", "en-fr"], steps=steps)
    return model, bank, opt


def test_capturable_matches_the_host_step_and_keeps_off_mask_bits():
    """capturable=True: step counts are float32 tensors on the param's device, the update equals
    the host-step path's (to float32 rounding), entries outside every trained pair's mask keep
    their bits."""
    model0, bank = _setup()
    before = copy.deepcopy(model0.state_dict())
    host, _, _ = _pair_run(False)
    dev, _, opt = _pair_run(True)
    for name, p in dev.named_parameters():
        torch.testing.assert_close(p, host.get_parameter(name), atol=2e-6, rtol=1e-5)
        st = opt.state[p]
        assert isinstance(st["step"], torch.Tensor) and st["step"].dtype == torch.float32
        assert st["step"].item() == 5.0
    for name in bank.names:
        union = bank.union(["en-de", "en-fr"])[name]
        keep = ls.unpack_mask(union, bank.shapes[name][-1])
        assert torch.equal(dev.get_parameter(name)[~keep], before[name][~keep]), name


def test_capturable_lr_tensor_is_read_on_every_step():
    """A tensor lr is read by the kernel: changed in place, the next step uses the new value
    (lr 0: nothing moves, weight decay included) — what a graph replay needs."""
    model, bank = _setup()
    lr = torch.tensor(1e-2)
    opt = MaskedAdamW(model.parameters(), lr=lr, capturable=True).bind(model, bank)
    _train(model, opt, ["en-de"], steps=2)
    lr.fill_(0.0)
    frozen = copy.deepcopy(model.state_dict())
    _train(model, opt, ["en-de"], steps=2, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(st["step"].item() == 4.0 for st in opt.state.values())


def test_capturable_float_lr_changes_take_effect():
    model, bank = _setup()
    opt = MaskedAdamW(model.parameters(), lr=1e-2, capturable=True).bind(model, bank)
    _train(model, opt, ["en-de"], steps=1)
    for g in opt.param_groups:
        g["lr"] = 0.0
    frozen = copy.deepcopy(model.state_dict())
    _train(model, opt, ["en-de"], steps=1, seed=4)
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("src,dst", [(True, False), (False, True)])
def test_state_dict_moves_between_host_and_device_step_counts(src, dst):
    """A checkpoint of either kind loads into either kind of optimizer and training goes on as
    if uninterrupted (the steps' bias corrections continue from the saved count)."""
    model, bank, opt = _pair_run(src, steps=3)
    model2 = copy.deepcopy(model)
    opt2 = MaskedAdamW(model2.parameters(), lr=1e-2, capturable=dst).bind(model2, bank)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no shared state
    steps = [opt2.state[p]["step"] for p in model2.parameters()]
    assert all((isinstance(s, torch.Tensor) if dst else type(s) is int) for s in steps)
    assert all(float(s) == 3.0 for s in steps)
    _train(model, opt, ["en-de"], steps=2, seed=7)
    _train(model2, opt2, ["en-de"], steps=2, seed=7)
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=name)


def test_capturable_op_checks_name_the_argument():
    p, g = [torch.randn(4, 8)], [torch.randn(4, 8)]
    m, v = [torch.zeros(4, 8)], [torch.zeros(4, 8)]
    kw = dict(lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match="state_steps must have one entry per param"):
        ls.masked_adamw_capturable_(p, g, m, v, [None], state_steps=[], **kw)
    with pytest.raises(TypeError, match=r"state_steps\[0\] must be a 1-element floating"):
        ls.masked_adamw_capturable_(p, g, m, v, [None], state_steps=[torch.tensor([1, 2])],
                                    **kw)
    with pytest.raises(TypeError, match="lr must be a 1-element floating tensor"):
        ls.masked_adamw_capturable_(p, g, m, v, [None], state_steps=[torch.tensor(1.0)],
                                    lr=0.1)
    with pytest.raises(ValueError, match="invalid beta1"):
        ls.masked_adamw_capturable_(p, g, m, v, [None], state_steps=[torch.tensor(1.0)],
                                    beta1=1.0, **kw)
    with pytest.raises(ValueError, match=r"bits\[0\]"):
        ls.masked_adamw_capturable_(p, g, m, v, [torch.zeros(4, 3, dtype=torch.int32)],
                                    state_steps=[torch.tensor(1.0)], **kw)
    with pytest.raises(ValueError, match="share memory"):
        ls.masked_adamw_capturable_(p, g, m, m, [None], state_steps=[torch.tensor(1.0)], **kw)


def test_capturable_op_opcheck_and_equals_masked_adamw():
    torch.manual_seed(0)
    p = [torch.randn(6, 40), torch.randn(5)]
    g = [torch.randn_like(t) for t in p]
    bits = [ls.pack_mask(torch.rand(6, 40) < 0.5), None]
    state = [[torch.zeros(t.shape) for t in p] for _ in range(2)]
    p2 = [t.clone() for t in p]
    state2 = [[t.clone() for t in s] for s in state]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    for step in (1, 2, 3):
        ls.masked_adamw_(p, g, *state, bits, lr=1e-2, step=step, maximize=True)
        torch._foreach_add_(steps, 1)
        ls.masked_adamw_capturable_(p2, g, *state2, bits, state_steps=steps,
                                    lr=torch.tensor(1e-2), maximize=True)
    for a, b in zip(p + state[0] + state[1], p2 + state2[0] + state2[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.library.opcheck(torch.ops.lass_sparse.masked_adamw_capturable_.default,
                          (p2, g, *state2, bits, steps, torch.tensor(1e-2), 0.9, 0.999, 1e-8,
                           0.01, False))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_whole_training_step_replays_from_a_cuda_graph(backend):
    """Forward, backward and ``MaskedAdamW(capturable=True).step()`` captured in one CUDA graph
    (torch.cuda.graphs' whole-network recipe) and replayed on new data: the same parameters as
    the eager steps from the same state, off-mask entries untouched, step counts advanced by
    the replays."""
    from lass_sparse.testing import require_backend

    require_backend(backend)
    model, bank = _setup()
    model.cuda()
    opt = MaskedAdamW(model.parameters(), lr=1e-2, capturable=True).bind(model, bank)
    x = torch.randn(6, 40, device="cuda")

    def step():
        with ls.active_pair(model, "en-de"):
            model(x).pow(2).mean().backward()
        opt.note_pair("en-de")
        opt.step()

    with ls.use_backend(backend):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(s)
        twin = copy.deepcopy(model)
        twin_opt = MaskedAdamW(twin.parameters(), lr=1e-2, capturable=True).bind(twin, bank)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        before = copy.deepcopy(model.state_dict())
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            step()
        data = [torch.randn(6, 40, device="cuda") for _ in range(3)]
        for d in data:
            x.copy_(d)
            g.replay()
        for d in data:
            twin_opt.zero_grad(set_to_none=True)
            with ls.active_pair(twin, "en-de"):
                twin(d).pow(2).mean().backward()
            twin_opt.note_pair("en-de")
            twin_opt.step()
    torch.cuda.synchronize()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    for name in bank.names:
        keep = ls.unpack_mask(bank.bits("en-de", name), bank.shapes[name][-1]).cuda()
        assert torch.equal(model.get_parameter(name)[~keep], before[name][~keep]), name
    assert all(st["step"].item() == 6.0 for st in opt.state.values())
