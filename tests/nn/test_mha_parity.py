"""MaskedMultiheadAttention against nn.MultiheadAttention in every configuration (issue 20,
item 14): kdim/vdim != embed_dim (separate q/k/v weights), add_bias_kv, add_zero_attn, no bias,
batch_first both ways, need_weights / average_attn_weights, is_causal, bool / float / 3-D masks,
unbatched inputs. An all-ones mask gives the original's outputs and gradients; a random mask
gives the original run with ``W ⊙ M`` (and gradients ``dW' ⊙ M``)."""

from __future__ import annotations

import copy
import warnings
import zlib

import pytest
import torch
from torch import nn

import lass_sparse as ls
from lass_sparse import MaskBank, MaskedMultiheadAttention

E, H, B, T, S = 16, 4, 2, 5, 6

CONFIGS = {
    "packed": {},
    "kdim-vdim": {"kdim": 12, "vdim": 10},
    "bias-kv": {"add_bias_kv": True},
    "zero-attn": {"add_zero_attn": True},
    "no-bias": {"bias": False},
    "all": {"kdim": 12, "vdim": 10, "add_bias_kv": True, "add_zero_attn": True},
}


def _inputs(cfg, batch_first, g, batched=True):
    def x(t, d):
        shape = (B, t, d) if batch_first else (t, B, d)
        out = torch.randn(*shape, generator=g)
        return out if batched else out[0] if batch_first else out[:, 0]

    q = x(T, E)
    k = x(S, cfg.get("kdim", E))
    v = x(S, cfg.get("vdim", E))
    return q, k, v


def _scenarios(g, self_attn: bool, batched=True):
    tk = T if self_attn else S
    causal = torch.ones(T, tk, dtype=torch.bool).triu(1)
    rand_bool = torch.rand(T, tk, generator=g) < 0.3
    rand_bool[:, 0] = False  # every query sees at least one key
    kpm = torch.zeros(B, tk, dtype=torch.bool)
    kpm[1, -2:] = True
    out = [
        ("none", {}),
        ("bool-mask", {"attn_mask": rand_bool}),
        ("float-mask", {"attn_mask": torch.randn(T, tk, generator=g)}),
        ("3d-mask", {"attn_mask": torch.randn(B * H, T, tk, generator=g)}),
        ("bool-kpm", {"key_padding_mask": kpm}),
        ("float-kpm", {"key_padding_mask": torch.randn(B, tk, generator=g)}),
        ("mask+kpm", {"attn_mask": rand_bool, "key_padding_mask": kpm}),
    ]
    if self_attn:
        out.append(("is-causal", {"attn_mask": causal, "is_causal": True}))
        out.append(("is-causal+kpm", {"attn_mask": causal, "is_causal": True,
                                      "key_padding_mask": kpm}))
    if not batched:
        out = [(n, {k: (v[0] if k == "key_padding_mask" else v) for k, v in kw.items()})
               for n, kw in out if "3d" not in n]
    return out


def _bank(m, kind, g):
    names = m._lass_param_names()
    bank = MaskBank({n: m.get_parameter(n).shape for n in names}, alpha=0.5)
    masks = {n: (torch.ones(m.get_parameter(n).shape, dtype=torch.bool) if kind == "ones"
                 else torch.rand(m.get_parameter(n).shape, generator=g) < 0.6) for n in names}
    bank.add_pair("p", masks)
    return bank


def _run(mod, args, kw, need_weights, average, r_out, r_w):
    out, w = mod(*args, need_weights=need_weights, average_attn_weights=average, **kw)
    loss = (out * r_out).sum()
    if w is not None:
        loss = loss + (w * r_w[: w.numel()].view_as(w)).sum()
    loss.backward()
    return out, w


def _grads(mod, args):
    g = {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}
    for i, a in enumerate(args):
        if a.grad is not None:
            g[f"input{i}"] = a.grad.clone()
    return g


def _zero(mod, args):
    mod.zero_grad(set_to_none=True)
    for a in args:
        a.grad = None


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["ones", "random"])
def test_masked_mha_matches_nn_mha(cfg_name, batch_first, kind):
    cfg = CONFIGS[cfg_name]
    g = torch.Generator().manual_seed(zlib.crc32(f"{cfg_name}{batch_first}{kind}".encode()))
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first, **cfg)
    if ref.bias_k is not None:
        with torch.no_grad():
            ref.bias_k.normal_()
            ref.bias_v.normal_()
    m = MaskedMultiheadAttention.from_mha(copy.deepcopy(ref))
    assert type(m.out_proj) is ls.MaskedLinear
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    bank = _bank(m, kind, g)
    ls.attach(m, bank)
    masked = copy.deepcopy(ref)  # the original with W ⊙ M
    bools = {n: ls.unpack_mask(bank.bits("p", n), m.get_parameter(n).shape[-1])
             for n in bank.names}
    with torch.no_grad():
        for n, mb in bools.items():
            masked.get_parameter(n).mul_(mb)
    same_dims = not ("kdim" in cfg or "vdim" in cfg)
    r = torch.randn(4096, generator=g)
    cases = 0
    for batched in (True, False):
        q, k, v = _inputs(cfg, batch_first, g, batched)
        for self_attn in ((True, False) if same_dims else (False,)):
            args_m = (q, q, q) if self_attn else (q, k, v)
            for name, kw in _scenarios(g, self_attn, batched):
                for need_weights, average in ((True, True), (True, False), (False, True)):
                    a_m = tuple(a.clone().requires_grad_() for a in args_m)
                    if self_attn:
                        a_m = (a_m[0],) * 3
                    a_r = tuple(a.detach().clone().requires_grad_() for a in a_m)
                    if self_attn:
                        a_r = (a_r[0],) * 3
                    where = f"{cfg_name} bf={batch_first} batched={batched} self={self_attn} "\
                            f"{name} nw={need_weights} avg={average}"
                    r_out = r[: q.numel()].view(q.shape)
                    with ls.active_pair(m, "p"):
                        out, w = _run(m, a_m, kw, need_weights, average, r_out, r)
                    out_r, w_r = _run(masked, a_r, kw, need_weights, average, r_out, r)
                    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-4, msg=where)
                    assert (w is None) == (w_r is None), where
                    if w is not None:
                        torch.testing.assert_close(w, w_r, atol=1e-5, rtol=1e-4, msg=where)
                    gm, gr = _grads(m, a_m), _grads(masked, a_r)
                    assert gm.keys() == gr.keys(), where
                    for n in gm:
                        want = gr[n] * bools[n] if n in bools else gr[n]
                        torch.testing.assert_close(gm[n], want, atol=1e-5, rtol=1e-4,
                                                   msg=f"{where} grad {n}")
                    _zero(m, a_m)
                    _zero(masked, a_r)
                    cases += 1
    assert cases >= 30
    q, k, v = _inputs(cfg, batch_first, g)
    torch.testing.assert_close(m(q, k, v)[0], ref(q, k, v)[0], rtol=0, atol=0)  # no pair


@pytest.mark.parametrize("cfg_name", ["bias-kv", "zero-attn", "packed"])
def test_kv_cache_with_bias_kv_and_zero_attn_matches_full_pass(cfg_name):
    torch.manual_seed(0)
    m = MaskedMultiheadAttention(E, H, batch_first=True, **CONFIGS[cfg_name])
    if m.bias_k is not None:
        with torch.no_grad():
            m.bias_k.normal_()
            m.bias_v.normal_()
    ls.attach(m, MaskBank.from_model(m, 0.5, pair="p"))
    m.eval()
    x = torch.randn(2, 6, E)
    with ls.active_pair(m, "p"):
        full, _ = m(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(6),
                    need_weights=False)
        cache, steps = {}, []
        for t in range(6):
            xt = x[:, t:t + 1]
            steps.append(m(xt, xt, xt, cache=cache, need_weights=False)[0])
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_convert_masks_every_mha_configuration_and_returns_exactly_its_names():
    """Before: kdim/vdim and bias_kv attention stayed dense with a warning while convert() still
    returned in_proj_weight names, so MaskBank.from_model raised KeyError '0.in_proj_weight'."""
    model = nn.ModuleList([
        nn.MultiheadAttention(E, H, kdim=12, vdim=10),
        nn.MultiheadAttention(E, H, add_bias_kv=True),
        nn.MultiheadAttention(E, H, add_zero_attn=True, batch_first=True),
    ])
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = ls.convert(model)
    assert list(model.state_dict()) == keys
    assert all(type(mm) is MaskedMultiheadAttention for mm in model)
    assert names == ["0.q_proj_weight", "0.k_proj_weight", "0.v_proj_weight",
                     "0.out_proj.weight", "1.in_proj_weight", "1.out_proj.weight",
                     "2.in_proj_weight", "2.out_proj.weight"]
    assert MaskBank.masked_parameters(model) == {n: 3 if n.endswith("in_proj_weight") else 1
                                           for n in names}
    assert model[0]._lass_param_names() == ["q_proj_weight", "k_proj_weight", "v_proj_weight",
                                            "out_proj.weight"]
    bank = MaskBank.from_model(model, 0.5, names=names, pair="p")
    assert bank.names == names
    ls.attach(model, bank)  # before: "model has no masked modules" / unknown parameter
    q, k, v = torch.randn(T, B, E), torch.randn(S, B, 12), torch.randn(S, B, 10)
    with ls.active_pair(model, "p"):
        out, _ = model[0](q, k, v)
    assert out.shape == (T, B, E)


def test_mixed_pair_batch_with_separate_projections_matches_per_pair_runs():
    torch.manual_seed(0)
    m = MaskedMultiheadAttention(E, H, kdim=12, vdim=10, batch_first=True)
    g = torch.Generator().manual_seed(3)
    names = m._lass_param_names()
    bank = MaskBank({n: m.get_parameter(n).shape for n in names}, alpha=0.5)
    for p in ("a", "b"):
        bank.add_pair(p, {n: torch.rand(m.get_parameter(n).shape, generator=g) < 0.5
                          for n in names})
    ls.attach(m, bank)
    q, k, v = torch.randn(3, T, E), torch.randn(3, S, 12), torch.randn(3, S, 10)
    ids = torch.tensor([1, 0, 1])
    with ls.active_pair(m, ["a", "b"], pair_ids=ids):
        mixed, _ = m(q, k, v, need_weights=False)
    for i, p in enumerate("ab"):
        rows = (ids == i).nonzero().flatten()
        with ls.active_pair(m, p):
            want, _ = m(q[rows], k[rows], v[rows], need_weights=False)
        torch.testing.assert_close(mixed[rows], want, atol=1e-5, rtol=1e-5)
