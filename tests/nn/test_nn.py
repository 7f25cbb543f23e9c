"""Drop-in modules: MaskedLinear, MaskedMultiheadAttention, convert(), active pair, mixed pairs."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lass_sparse as ls
from lass_sparse import MaskBank, MaskedLinear, MaskedMultiheadAttention


def _linear_bank(layer: nn.Module, pairs=("en-de", "en-fr"), keep=0.5):
    names = {n: p.shape for n, p in layer.named_parameters() if n.endswith("weight")
             and p.dim() == 2}
    bank = MaskBank(names, alpha=1 - keep)
    for p in pairs:
        bank.add_pair(p, {n: torch.rand(s) < keep for n, s in names.items()})
    return bank


def _masked_weight(bank, pair, name, w):
    return w * ls.unpack_mask(bank.bits(pair, name), w.shape[-1]).to(w.dtype)


def test_masked_linear_is_nn_linear_without_a_pair_and_masked_with_one():
    lin = nn.Linear(40, 24)
    m = MaskedLinear.from_linear(lin)
    assert m.weight is lin.weight and m.bias is lin.bias and isinstance(m, nn.Linear)
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)
    bank = _linear_bank(m)
    ls.attach(m, bank)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)  # attached, no pair active
    with ls.active_pair(m, "en-fr"):
        want = F.linear(x, _masked_weight(bank, "en-fr", "weight", lin.weight), lin.bias)
        torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)  # restored


def test_masked_linear_backward_gives_masked_dw():
    m = MaskedLinear(33, 20)
    bank = _linear_bank(m)
    ls.attach(m, bank)
    ls.set_active_pair(m, "en-de")
    m(torch.randn(7, 33)).sum().backward()
    mask = ls.unpack_mask(bank.bits("en-de", "weight"), 33)
    assert not m.weight.grad[~mask].any() and m.weight.grad[mask].abs().sum() > 0
    assert m.bias.grad is not None


def test_state_dict_compatible_both_ways():
    lin = nn.Linear(16, 8)
    m = MaskedLinear(16, 8)
    m.load_state_dict(lin.state_dict())
    assert set(m.state_dict()) == {"weight", "bias"}
    lin.load_state_dict(m.state_dict())
    mha, mm = nn.MultiheadAttention(16, 4), MaskedMultiheadAttention(16, 4)
    mm.load_state_dict(mha.state_dict())
    assert set(mm.state_dict()) == set(mha.state_dict())
    mha.load_state_dict(mm.state_dict())


def test_unknown_pair_raises_keyerror_listing_pairs():
    m = MaskedLinear(8, 8)
    ls.attach(m, _linear_bank(m))
    with pytest.raises(KeyError, match=r"known pairs: \['en-de', 'en-fr'\]"):
        ls.set_active_pair(m, "xx-yy")


def test_bank_with_wrong_shapes_or_names_is_refused_naming_the_parameter():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    ls.convert(model)
    bank = MaskBank({"0.weight": (8, 8), "2.weight": (4, 9)})
    with pytest.raises(ValueError, match=r"'2.weight' is for shape \[4, 9\].*\[4, 8\]"):
        ls.attach(model, bank)
    with pytest.raises(ValueError, match="'7.weight'"):
        ls.attach(model, MaskBank({"7.weight": (8, 8)}))


def test_deepcopy_and_pickle_keep_the_shared_context():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    ls.convert(model)
    bank = MaskBank.from_model(model, 0.5, pair="en-de")
    ls.attach(model, bank)
    ls.set_active_pair(model, "en-de")
    x = torch.randn(2, 8)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(x), model(x))
        assert clone[0]._lass_ctx is clone[1]._lass_ctx is not model[0]._lass_ctx
        ls.set_active_pair(clone, None)
        assert model[0]._lass_ctx.pair == "en-de"


def test_requires_grad_false_and_autocast():
    m = MaskedLinear(64, 32)
    ls.attach(m, _linear_bank(m))
    ls.set_active_pair(m, "en-de")
    m.requires_grad_(False)
    x = torch.randn(4, 64, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m.weight.grad is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    want = F.linear(x, _masked_weight(m._lass_ctx.bank, "en-de", "weight", m.weight), m.bias)
    torch.testing.assert_close(y.float(), want, atol=5e-2, rtol=5e-2)


def test_autocast_applies_the_mask_in_the_weight_cast(monkeypatch):
    """Under autocast with fp32 weights a masked layer runs masked_cast (W ⊙ M cast in one pass)
    and F.linear on it: the same values as autocast's F.linear on the masked weight, grads of
    the weight's dtype that are exactly 0 off the mask; the fused QKV projection likewise
    (q, k, v as masked_qkv_proj's). bf16 weights keep the fused masked_linear route."""
    torch.manual_seed(0)
    m = MaskedLinear(64, 32)
    bank = _linear_bank(m)
    ls.attach(m, bank)
    x = torch.randn(6, 64, requires_grad=True)
    calls = []
    real = ls.ops.masked_cast
    monkeypatch.setattr(ls.ops, "masked_cast", lambda *a: calls.append(a[2]) or real(*a))
    with ls.active_pair(m, "en-de"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y.float().pow(2).sum().backward()
    assert calls == [torch.bfloat16] and y.dtype == torch.bfloat16
    wm = _masked_weight(bank, "en-de", "weight", m.weight.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x.detach(), wm, m.bias.detach())
    assert torch.equal(y, want)  # the very op autocast runs, on the very same bf16 weight
    mask = ls.unpack_mask(bank.bits("en-de", "weight"), 64)
    assert m.weight.grad.dtype == torch.float32 and not m.weight.grad[~mask].any()
    w_ref = m.weight.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.linear(x.detach(), w_ref * mask, m.bias.detach()).float().pow(2).sum().backward()
    torch.testing.assert_close(m.weight.grad, w_ref.grad * mask, rtol=0, atol=0)
    m16 = MaskedLinear(64, 32).to(torch.bfloat16)
    ls.attach(m16, _linear_bank(m16))
    calls.clear()
    with ls.active_pair(m16, "en-de"), torch.autocast("cpu", dtype=torch.bfloat16):
        m16(x.to(torch.bfloat16))
    assert calls == []
    mha = MaskedMultiheadAttention(32, 4, batch_first=True)
    ls.attach(mha, _linear_bank(mha))
    q = torch.randn(2, 5, 32)
    with ls.active_pair(mha, "en-fr"), torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = mha(q, q, q, need_weights=False)
    assert calls == [torch.bfloat16] * 2  # in_proj (q, k, v at once) and out_proj
    m64 = MaskedLinear(64, 32).double()  # autocast leaves float64 alone: so do the layers
    ls.attach(m64, _linear_bank(m64))
    with ls.active_pair(m64, "en-de"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert m64(x.detach().double()).dtype == torch.float64
        assert nn.Linear(64, 32).double()(x.detach().double()).dtype == torch.float64
    with ls.active_pair(mha, "en-fr"):  # fp32 reference through the fused fp32 route
        ref, _ = mha(q, q, q, need_weights=False)
    torch.testing.assert_close(got.float(), ref, atol=5e-2, rtol=5e-2)


def test_materialized_runs_the_dense_op_on_a_kept_masked_copy(monkeypatch):
    """Inside materialized(model), no-grad single-pair forwards run F.linear on W ⊙ M made once
    per layer, pair and dtype: the same values as the masked path (bit for bit: the same F.linear
    on the same masked weight), masked_cast called once per layer over several steps, again
    for another pair, after an in-place change of W, under autocast (another dtype); calls with
    grad, mixed-pair batches and calls after the block use the fused ops; the copies are freed
    when the outermost block ends."""
    torch.manual_seed(0)
    model = nn.Sequential(MaskedLinear(32, 48), nn.ReLU(), MaskedLinear(48, 16))
    mha = MaskedMultiheadAttention(16, 4, batch_first=True)
    bank = _linear_bank(model)
    ls.attach(model, bank)
    ls.attach(mha, _linear_bank(mha))
    x = torch.randn(6, 32)
    calls = []
    real = ls.ops.masked_cast
    monkeypatch.setattr(ls.ops, "masked_cast", lambda *a: calls.append(a[2]) or real(*a))

    def dense(pair):
        w0, w2 = (_masked_weight(bank, pair, f"{i}.weight", model[i].weight) for i in (0, 2))
        return F.linear(F.relu(F.linear(x, w0, model[0].bias)), w2, model[2].bias)

    with torch.no_grad():
        with ls.materialized(model), ls.active_pair(model, "en-de"):
            outs = [model(x) for _ in range(3)]
            assert len(calls) == 2  # one copy per layer, reused by every step
            ctx = ls.nn.get_context(model)
            assert len(ctx.merged) == 2
            with ls.materialized(model):  # nested: the same copies
                model(x)
            assert len(calls) == 2 and ctx.merged is not None
            with ls.active_pair(model, "en-fr"):
                fr = model(x)
            assert len(calls) == 4
            model[2].weight.mul_(2.0)  # in place: masked again
            doubled = model(x)
            assert len(calls) == 5
            model[2].weight.div_(2.0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                amp = model(x)
            assert calls[-2:] == [torch.bfloat16] * 2 and amp.dtype == torch.bfloat16
            with ls.active_pair(model, ["en-de", "en-fr"], pair_ids=torch.tensor([0, 1] * 3)):
                n = len(calls)
                model(x)  # mixed pairs: the segmented op
                assert len(calls) == n
        assert ctx.merged is None  # freed
    for y in outs:
        assert torch.equal(y, dense("en-de"))
    assert torch.equal(fr, dense("en-fr"))
    torch.testing.assert_close(doubled, dense("en-de") + F.linear(
        F.relu(F.linear(x, _masked_weight(bank, "en-de", "0.weight", model[0].weight),
                        model[0].bias)),
        _masked_weight(bank, "en-de", "2.weight", model[2].weight)))
    with ls.materialized(model), ls.active_pair(model, "en-de"):  # grad: the fused ops
        n = len(calls)
        model(x).sum().backward()
        assert len(calls) == n and model[0].weight.grad is not None
    q = torch.randn(2, 5, 16)
    with torch.no_grad(), ls.active_pair(mha, "en-de"):
        want, _ = mha(q, q, q, need_weights=False)
        with ls.materialized(mha):
            n = len(calls)
            got, _ = mha(q, q, q, need_weights=False)
            got2, _ = mha(q, q, q, need_weights=False)
            assert len(calls) == n + 2  # in_proj (q, k, v at once) and out_proj, once
    torch.testing.assert_close(got, want)
    assert torch.equal(got, got2)


def test_compile_fullgraph_under_autocast_matches_eager():
    """The autocast route (masked_cast, then F.linear) traces without graph breaks; outputs
    equal eager's, fp32 grads to bf16 tolerance (exact zeros off the masks in both)."""
    torch.manual_seed(0)
    model = nn.Sequential(MaskedLinear(32, 48), nn.GELU(), MaskedLinear(48, 16))
    ls.attach(model, MaskBank.from_model(model, 0.6, pair="en-de"))
    ls.set_active_pair(model, "en-de")
    x = torch.randn(5, 32)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()
        return y

    eager = step(x)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(lambda x: model(x), fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
    y.float().square().sum().backward()
    assert torch.equal(y, eager)
    for p, g in zip(model.parameters(), grads):  # inductor fuses the bf16 GELU backward
        torch.testing.assert_close(p.grad, g, rtol=2e-2, atol=5e-3)
        if p.dim() == 2:
            assert torch.equal(p.grad == 0, g == 0)  # the masks: exact zeros in both


def test_compile_fullgraph_matches_eager():
    model = nn.Sequential(MaskedLinear(32, 48), nn.GELU(), MaskedLinear(48, 16))
    bank = MaskBank.from_model(model, 0.6, pair="en-de")
    ls.attach(model, bank)
    ls.set_active_pair(model, "en-de")
    x = torch.randn(5, 32)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)


def test_one_compiled_graph_serves_every_pair():
    """torch.compile of a masked model: switching pairs refills static bit buffers instead of
    recompiling — two graphs for four pairs (the first compiled call's, then the static one),
    outputs and grads equal eager per pair; fullgraph (no breaks)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = nn.Sequential(MaskedLinear(32, 48), nn.GELU(), MaskedLinear(48, 16))
    bank = _linear_bank(model, pairs=("en-de", "en-fr", "en-es", "en-it"))
    ctx = ls.attach(model, bank)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 32)
    for pair in ("en-de", "en-fr", "en-es", "en-de", "en-it"):
        with ls.active_pair(model, pair):
            y = compiled(x)
            y.square().sum().backward()
            got = [y.detach()] + [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            want_y = model(x)
            want_y.square().sum().backward()
            want = [want_y.detach()] + [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert set(ctx._static) == {(n, torch.device("cpu")) for n in bank.names}


@pytest.mark.gpu
def test_reduce_overhead_graphs_serve_every_pair_on_the_gpu():
    """On the device: ``mode="reduce-overhead"`` (CUDA graphs) over alternating pairs — the
    static bit buffers keep their addresses, so replays read the current pair's bits."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = nn.Sequential(MaskedLinear(32, 48), nn.GELU(), MaskedLinear(48, 16)).cuda()
    bank = _linear_bank(model, pairs=("en-de", "en-fr", "en-es"))
    ls.attach(model, bank)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(5, 32, device="cuda")
    for pair in ("en-de", "en-fr", "en-es") * 3:
        with ls.active_pair(model, pair):
            got = compiled(x).clone()
            torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_static_bits_only_after_a_compiled_forward_and_one_pair_at_a_time():
    """Eager use never makes the static buffers; with them, a second thread holding another
    pair turns them off (compiled forwards then read per-pair copies), and they refill with
    the right bits when one pair is left."""
    import threading

    model = MaskedLinear(40, 24)
    bank = _linear_bank(model, pairs=("en-de", "en-fr"))
    ctx = ls.attach(model, bank)
    with ls.active_pair(model, "en-de"):
        model(torch.randn(2, 40))
    assert not ctx._static and not ctx._static_devices
    ctx._static_devices.add(torch.device("cpu"))  # as a compiled forward records it
    ctx.set("en-de")
    assert ctx._static_ok and torch.equal(ctx._static[("weight", torch.device("cpu"))],
                                          bank.bits("en-de", "weight"))
    inside, leave = threading.Event(), threading.Event()

    def other():
        with ls.active_pair(model, "en-fr"):
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(30)
    ctx.set("en-de")
    assert not ctx._static_ok  # two threads, two pairs: the buffers cannot serve both
    leave.set()
    t.join(30)
    ctx.set("en-fr")
    assert ctx._static_ok and torch.equal(ctx._static[("weight", torch.device("cpu"))],
                                          bank.bits("en-fr", "weight"))


def test_mixed_pair_rows_match_per_pair_runs():
    m = MaskedLinear(40, 24)
    bank = _linear_bank(m, pairs=("en-de", "en-fr", "en-zh"))
    ls.attach(m, bank)
    x = torch.randn(6, 3, 40, requires_grad=True)  # batch-first [B, T, K]
    ids = torch.tensor([2, 0, 2, 1, 0, 0])  # unsorted on purpose
    pairs = ["en-de", "en-fr", "en-zh"]
    with ls.active_pair(m, pairs, pair_ids=ids):
        y = m(x)
    want = torch.stack([
        F.linear(x[b], _masked_weight(bank, pairs[int(i)], "weight", m.weight), m.bias)
        for b, i in enumerate(ids)
    ])
    torch.testing.assert_close(y, want)
    y.sum().backward()
    union = ls.unpack_mask(bank.union(pairs)["weight"], 40)
    assert not m.weight.grad[~union].any()
    with pytest.raises(ValueError, match="pair_ids has 4 entries"):
        with ls.active_pair(m, pairs, pair_ids=torch.tensor([0, 1, 2, 0])):
            m(x)


class _AttnBlock(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.attn = MaskedMultiheadAttention(d, heads, batch_first=True)
        self.ff = MaskedLinear(d, 16)

    def forward(self, x):
        return self.ff(self.attn(x, x, x, need_weights=False)[0] + x)


def test_one_compiled_graph_serves_every_mixed_batch():
    """torch.compile of mixed-pair batches (pair_ids): the row grouping is built from tensor
    ops of static shape inside the graph, so no batch composition graph-breaks or recompiles —
    at most two graphs (the first call's, then the one with the bank's stack cached) for six
    compositions (unsorted, one pair only, pairs missing), fullgraph; outputs and grads equal
    eager, off-union weights get no gradient."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = _AttnBlock()
    pairs = ["en-de", "en-fr", "en-es", "en-it"]
    bank = _linear_bank(model, pairs=pairs)
    ls.attach(model, bank)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(6, 5, 32)
    for ids in ([0, 1, 2, 3, 0, 1], [1, 1, 0, 0, 2, 2], [3, 3, 3, 3, 3, 3], [2, 0, 3, 1, 0, 0],
                [0, 0, 0, 1, 1, 1], [1, 0, 1, 0, 1, 0]):
        with ls.active_pair(model, pairs, pair_ids=torch.tensor(ids)):
            got, want = [], []
            for fn, out in ((compiled, got), (model, want)):
                model.zero_grad(set_to_none=True)
                y = fn(x)
                y.square().sum().backward()
                out += [y.detach()] + [p.grad.clone() for p in model.parameters()]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        used = bank.union([pairs[i] for i in set(ids)])
        w = model.ff.weight
        assert not w.grad[~ls.unpack_mask(used["ff.weight"], w.shape[1])].any()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert not torch._dynamo.utils.counters["graph_break"]


def test_mixed_batches_of_any_pairs_share_one_bank_stack(tmp_path):
    """Any subset or order of pairs in a mixed batch indexes the bank's one stack: no copy per
    combination, and the bank's per-pair bits are views of it (1 bit per weight per pair)."""
    m = MaskedLinear(40, 24)
    names = ("en-de", "en-fr", "en-zh", "de-en")
    bank = _linear_bank(m, pairs=names)
    ls.attach(m, bank)
    x = torch.randn(5, 40)
    for pairs in (["en-zh", "en-de"], ["de-en"], ["en-fr", "de-en", "en-de"], list(names)):
        ids = torch.randint(len(pairs), (5,))
        with ls.active_pair(m, pairs, pair_ids=ids):
            y = m(x)
        want = torch.stack([F.linear(x[r], _masked_weight(bank, pairs[int(i)], "weight",
                                                           m.weight), m.bias)
                            for r, i in enumerate(ids)])
        torch.testing.assert_close(y, want)
    stack = bank.stack()["weight"]
    assert stack.shape[0] == len(names)
    for i, p in enumerate(names):  # views: the stack is the bank's only copy
        assert bank.bits(p, "weight").untyped_storage().data_ptr() == \
            stack.untyped_storage().data_ptr()
        assert torch.equal(stack[i], bank.bits(p, "weight"))
    cached = [k for k in m._lass_ctx._cache if k[1] == "weight"]
    assert len(cached) == 1, cached
    assert torch.equal(bank.stack(["en-zh", "en-de"])["weight"], stack[[2, 0]])
    bank.save(str(tmp_path / "b.safetensors"))  # views are saved as their own tensors
    assert MaskBank.load(str(tmp_path / "b.safetensors")).equal(bank)
    bank.remove_pair("en-fr")  # indices move: the next mixed batch uses the new ones
    with ls.active_pair(m, ["de-en", "en-zh"], pair_ids=torch.tensor([0, 1, 1, 0, 1])):
        y = m(x)
    want = torch.stack([F.linear(x[r], _masked_weight(bank, p, "weight", m.weight), m.bias)
                        for r, p in enumerate(["de-en", "en-zh", "en-zh", "de-en", "en-zh"])])
    torch.testing.assert_close(y, want)


def _mha_inputs(batch_first, b=3, t=5, e=32):
    shape = (b, t, e) if batch_first else (t, b, e)
    return torch.randn(*shape)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_masked_mha_equals_nn_mha_with_masked_weights(batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    m = MaskedMultiheadAttention.from_mha(mha)
    bank = MaskBank.from_model(m, 0.5, pair="en-de")
    assert set(bank.names) == {"in_proj_weight", "out_proj.weight"}
    ls.attach(m, bank)
    ref = copy.deepcopy(mha)
    with torch.no_grad():
        ref.in_proj_weight.copy_(_masked_weight(bank, "en-de", "in_proj_weight",
                                                mha.in_proj_weight))
        ref.out_proj.weight.copy_(_masked_weight(bank, "en-de", "out_proj.weight",
                                                 mha.out_proj.weight))
    x, mem = _mha_inputs(batch_first), _mha_inputs(batch_first, t=7)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with ls.active_pair(m, "en-de"):
        for args, kw in [((x, x, x), {"attn_mask": causal}), ((x, mem, mem),
                         {"key_padding_mask": kpm})]:
            out, w = m(*args, need_weights=need_weights, **kw)
            out_r, w_r = ref(*args, need_weights=need_weights, **kw)
            torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-5)
            if need_weights:
                torch.testing.assert_close(w, w_r, atol=1e-5, rtol=1e-5)
    out, _ = m(x, x, x)  # no pair: exactly nn.MultiheadAttention
    torch.testing.assert_close(out, mha(x, x, x)[0], rtol=0, atol=0)


def test_masked_mha_kv_cache_matches_full_causal_pass(monkeypatch):
    torch.manual_seed(0)
    fused = []  # cached self-attention steps take the fused q/k/v projection, as a full pass
    real = ls.ops.masked_qkv_proj
    monkeypatch.setattr(ls.ops, "masked_qkv_proj",
                        lambda *a: fused.append(a[0].shape[1]) or real(*a))
    m = MaskedMultiheadAttention(32, 4, batch_first=True)
    ls.attach(m, MaskBank.from_model(m, 0.5, pair="en-de"))
    ls.set_active_pair(m, "en-de")
    m.eval()
    x, mem = torch.randn(2, 6, 32), torch.randn(2, 4, 32)
    full, _ = m(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(6),
                need_weights=False)
    cross_full, _ = m(x, mem, mem, need_weights=False)
    cache, xcache, steps, xsteps = {}, {}, [], []
    for t in range(6):
        xt = x[:, t:t + 1]
        steps.append(m(xt, xt, xt, cache=cache, need_weights=False)[0])
        xsteps.append(m(xt, mem, mem, cache=xcache, static_kv=True, need_weights=False)[0])
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(xsteps, 1), cross_full, atol=1e-5, rtol=1e-5)
    assert cache["k"].shape == (2, 4, 6, 8) and xcache["k"].shape == (2, 4, 4, 8)
    assert fused == [6] + [1] * 6  # the full causal pass, then each self-attention step


def test_masked_mha_gradients_are_masked():
    m = MaskedMultiheadAttention(32, 4, batch_first=True)
    bank = MaskBank.from_model(m, 0.5, pair="en-de")
    ls.attach(m, bank)
    ls.set_active_pair(m, "en-de")
    x = torch.randn(2, 5, 32)
    m(x, x, x, need_weights=False)[0].sum().backward()
    for name in ("in_proj_weight", "out_proj.weight"):
        mask = ls.unpack_mask(bank.bits("en-de", name), 32)
        assert not m.get_parameter(name).grad[~mask].any(), name


def test_convert_nn_transformer_masks_everything_but_norms():
    torch.manual_seed(0)
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=64, dropout=0.0, batch_first=True)
    ref = copy.deepcopy(model)
    names = ls.convert(model)
    assert "encoder.layers.0.self_attn.in_proj_weight" in names
    assert "decoder.layers.1.multihead_attn.out_proj.weight" in names
    assert "decoder.layers.0.linear2.weight" in names
    assert not any("norm" in n for n in names)
    src, tgt = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    tmask = nn.Transformer.generate_square_subsequent_mask(5)
    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt, tgt_mask=tmask), ref(src, tgt, tgt_mask=tmask))
    bank = MaskBank.from_model(model, 0.5, pair="en-de")
    ls.attach(model, bank)
    with torch.no_grad():
        for n in names:
            p = ref.get_parameter(n)
            p.copy_(_masked_weight(bank, "en-de", n, p))
    with torch.no_grad(), ls.active_pair(model, "en-de"):  # inference: fast path must be off
        torch.testing.assert_close(model(src, tgt, tgt_mask=tmask),
                                   ref(src, tgt, tgt_mask=tmask), atol=1e-5, rtol=1e-5)


def test_convert_include_exclude_and_output_projection():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.body = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
            self.lm_head = nn.Linear(8, 10)
            self.tied = nn.Linear(8, 10, bias=False)
            self.tied.weight = self.embed.weight

    assert ls.convert(LM()) == ["body.0.weight", "body.1.weight"]
    assert ls.convert(LM(), include=["body.1"]) == ["body.1.weight"]
    assert ls.convert(LM(), exclude=["body.*"]) == ["lm_head.weight"]
    with pytest.raises(ValueError, match="from_linear"):
        ls.convert(nn.Linear(2, 2))


def test_convert_marian_from_small_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MarianConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0,
        decoder_start_token_id=0, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.MarianMTModel(cfg).eval()
    ids = torch.randint(1, 64, (2, 6))
    before = model(input_ids=ids, decoder_input_ids=ids).logits
    names = ls.convert(model)
    assert "model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert not any("lm_head" in n or "embed" in n for n in names)
    bank = MaskBank.from_model(model, 0.5, pair="en-de")
    ls.attach(model, bank)
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, before)
    with ls.active_pair(model, "en-de"):
        after = model(input_ids=ids, decoder_input_ids=ids).logits
    assert not torch.allclose(after, before)


def test_masked_modules_take_the_same_arguments_as_their_nn_originals():
    """Issue 20 item 13: `MaskedLinear()(input=x)` failed ("unexpected keyword argument
    'input'")."""
    import inspect

    def params(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert params(MaskedLinear.forward) == params(nn.Linear.forward)
    mha_params = list(inspect.signature(nn.MultiheadAttention.forward).parameters)
    assert list(inspect.signature(MaskedMultiheadAttention.forward).parameters)[
        :len(mha_params)] == mha_params
    m = MaskedLinear(8, 4)
    ls.attach(m, _linear_bank(m))
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(input=x), F.linear(x, m.weight, m.bias), rtol=0, atol=0)
    with ls.active_pair(m, "en-de"):
        torch.testing.assert_close(m(input=x), m(x), rtol=0, atol=0)
    emb = nn.Embedding(6, 8)
    tied = ls.MaskedTiedLinear(emb)
    torch.testing.assert_close(tied(input=x), x @ emb.weight.T)
