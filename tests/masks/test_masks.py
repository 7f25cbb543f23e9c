"""MaskBank: construction, similarity vs brute force, merge, union, stack, files, bad input."""

from __future__ import annotations

import os

import pytest
import torch

import lass_sparse as ls
from lass_sparse.masks import MaskBank, component_key, layer_key

SHAPES = {
    "encoder.layers.0.fc1.weight": (24, 40),
    "encoder.layers.1.fc1.weight": (24, 40),
    "decoder.layers.0.fc1.weight": (16, 33),
    "decoder.layers.0.self_attn.in_proj_weight": (48, 16),
    "shared.weight": (5, 1),
}


def _bank(pairs=("en-de", "en-fr", "de-en", "fr-en", "en-zh"), keep=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = MaskBank(SHAPES, alpha=1 - keep)
    for p in pairs:
        bank.add_pair(p, {n: torch.rand(s, generator=g) < keep for n, s in SHAPES.items()})
    return bank


def _bool(bank, pair):
    return {n: ls.unpack_mask(b, SHAPES[n][-1]) for n, b in bank[pair].items()}


def test_add_pair_packs_and_round_trips():
    bank = _bank()
    assert bank.pairs == ["en-de", "en-fr", "de-en", "fr-en", "en-zh"]
    for n, b in bank["en-de"].items():
        assert b.dtype == torch.int32 and b.shape == (SHAPES[n][0], (SHAPES[n][1] + 31) // 32)
    packed = MaskBank(SHAPES)
    packed.add_pair("x", bank["en-de"])  # already-packed bits accepted too
    assert torch.equal(packed.bits("x", "shared.weight"), bank.bits("en-de", "shared.weight"))


def test_unknown_pair_lists_known_pairs():
    bank = _bank(pairs=("en-de", "en-fr"))
    with pytest.raises(KeyError, match=r"unknown pair 'xx-yy'.*\['en-de', 'en-fr'\]"):
        bank["xx-yy"]


@pytest.mark.parametrize("by", ["total", "param", "layer", "component"])
def test_similarity_matches_brute_force(by):
    bank = _bank()
    a, b = _bool(bank, "en-de"), _bool(bank, "en-fr")
    key = {"total": lambda n: "total", "param": lambda n: n, "layer": layer_key,
           "component": component_key}[by]
    inter, size = {}, {}
    for n in SHAPES:
        g = key(n)
        inter[g] = inter.get(g, 0) + int((a[n] & b[n]).sum())
        size[g] = size.get(g, 0) + int(a[n].sum())
    want = {g: inter[g] / size[g] for g in inter}
    got = bank.similarity("en-de", "en-fr", by=by)
    if by == "total":
        assert got == pytest.approx(want["total"])
    else:
        assert got == pytest.approx(want)
    assert bank.similarity("en-de", "en-de") == 1.0


def test_layer_and_component_keys():
    assert layer_key("encoder.layers.3.fc1.weight") == "encoder.layers.3"
    assert component_key("encoder.layers.3.fc1.weight") == "encoder.layers.*.fc1.weight"


def test_merge_takes_encoder_from_first_and_decoder_from_second():
    bank = _bank()
    m = bank.merge("fr-en", "en-zh")
    for n in SHAPES:
        if n.startswith("encoder."):
            assert torch.equal(m[n], bank.bits("fr-en", n))
        elif n.startswith("decoder."):
            assert torch.equal(m[n], bank.bits("en-zh", n))
        else:  # neither prefix: union by default
            assert torch.equal(m[n], bank.bits("fr-en", n) | bank.bits("en-zh", n))
    bank.add_pair("fr-zh", m)
    assert "fr-zh" in bank


def test_union_intersection_stack():
    bank = _bank()
    u, i = bank.union(["en-de", "en-fr"]), bank.intersection(["en-de", "en-fr"])
    a, b = _bool(bank, "en-de"), _bool(bank, "en-fr")
    for n, (_, s1) in SHAPES.items():
        assert torch.equal(ls.unpack_mask(u[n], s1), a[n] | b[n])
        assert torch.equal(ls.unpack_mask(i[n], s1), a[n] & b[n])
    st = bank.stack(["en-fr", "en-de"])
    assert st["shared.weight"].shape == (2, 5, 1)
    assert torch.equal(st["shared.weight"][1], bank.bits("en-de", "shared.weight"))


def test_random_like_keeps_the_magnitude_count_and_is_deterministic():
    bank = _bank(pairs=("en-de", "en-fr"))
    r1, r2 = bank.random_like(0.7, seed=3), bank.random_like(0.7, seed=3)
    assert r1.equal(r2) and r1.rule == "random"
    assert not r1.equal(bank.random_like(0.7, seed=4))
    for n, s in SHAPES.items():
        numel = s[0] * s[1]
        assert int(_bool(r1, "en-de")[n].sum()) == numel - int(0.7 * numel)
    assert not torch.equal(r1.bits("en-de", SHAPES and "encoder.layers.0.fc1.weight"),
                           r1.bits("en-fr", "encoder.layers.0.fc1.weight"))


def test_from_model_magnitude_rule_per_tensor_and_per_qkv_chunk():
    model = torch.nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1,
                                 num_decoder_layers=1, dim_feedforward=64)
    bank = MaskBank.from_model(model, 0.6, pair="en-de")
    w = dict(model.named_parameters())
    name = "encoder.layers.0.self_attn.in_proj_weight"
    assert bank.shapes[name] == (96, 32)
    want = torch.cat([ls.magnitude_mask(c, 0.6) for c in w[name].detach().chunk(3)])
    assert torch.equal(bank.bits("en-de", name), want)
    lin = "encoder.layers.0.linear1.weight"
    assert torch.equal(bank.bits("en-de", lin), ls.magnitude_mask(w[lin].detach(), 0.6))
    assert not any("norm" in n for n in bank.names)


@pytest.mark.parametrize("compact", [False, True])
def test_save_load_round_trip(tmp_path, compact):
    bank = _bank()
    path = str(tmp_path / "bank.safetensors")
    size = bank.save(path, compact=compact)
    assert os.path.getsize(path) == size
    loaded = MaskBank.load(path)
    assert loaded.equal(bank) and loaded.alpha == bank.alpha and loaded.rule == bank.rule
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_compact_form_is_small_for_overlapping_masks(tmp_path):
    """Related pairs share most of their masks: base + XOR deltas compress well."""
    torch.manual_seed(0)
    shapes = {"w": (256, 512)}
    base = torch.rand(256, 512) < 0.3
    bank = MaskBank(shapes, alpha=0.7)
    for i in range(8):
        flip = torch.rand(256, 512) < 0.02
        bank.add_pair(f"p{i}", {"w": base ^ flip})
    plain = bank.save(str(tmp_path / "a.st"))
    compact = bank.save(str(tmp_path / "b.st"), compact=True)
    bits_per_weight_pair = compact * 8 / (256 * 512 * 8)
    assert compact < plain / 3
    assert bits_per_weight_pair < 0.5
    assert MaskBank.load(str(tmp_path / "b.st")).equal(bank)


@pytest.mark.parametrize("compact", [False, True])
def test_corrupted_byte_is_refused_naming_the_tensor(tmp_path, compact):
    bank = _bank()
    path = str(tmp_path / "bank.safetensors")
    bank.save(path, compact=compact)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch for tensor|does not decode"):
        MaskBank.load(path)


def test_load_refuses_other_versions_and_non_banks(tmp_path):
    from safetensors.torch import save_file

    p = str(tmp_path / "x.st")
    save_file({"a": torch.zeros(2)}, p, metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not a mask bank"):
        MaskBank.load(p)
    bank = _bank(pairs=("en-de",))
    bank.save(p)
    from safetensors import safe_open

    with safe_open(p, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = "99"
    save_file(tensors, p, metadata=meta)
    with pytest.raises(ValueError, match="format version 99"):
        MaskBank.load(p)
    open(p, "wb").write(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        MaskBank.load(p)


def test_bad_masks_are_rejected_naming_the_parameter():
    bank = MaskBank(SHAPES)
    good = {n: torch.ones(s, dtype=torch.bool) for n, s in SHAPES.items()}
    with pytest.raises(ValueError, match="missing"):
        bank.add_pair("a-b", {k: v for k, v in good.items() if k != "shared.weight"})
    bad = dict(good, **{"shared.weight": torch.ones(5, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shared.weight"):
        bank.add_pair("a-b", bad)
    bad = dict(good, **{"shared.weight": torch.full((5, 1), 3, dtype=torch.int32)})
    with pytest.raises(ValueError, match="padding"):
        bank.add_pair("a-b", bad)
    bank.add_pair("a-b", good)
    with pytest.raises(ValueError, match="exists"):
        bank.add_pair("a-b", good)
    bank.remove_pair("a-b")
    assert len(bank) == 0


def test_stats_exactly_one_bit_per_weight_per_pair_for_36_pairs_of_transformer_big():
    """Transformer-big masked shapes (d=1024, ffn=4096, 6+6 layers); K is a multiple of 32, so
    the packed bank is exactly 1 bit per weight per pair, measured on allocated tensors."""
    d, f = 1024, 4096
    enc = [(3 * d, d), (d, d), (f, d), (d, f)]
    dec = enc + [(3 * d, d), (d, d)]
    shapes = {f"encoder.{i}.{j}": s for i in range(6) for j, s in enumerate(enc)}
    shapes |= {f"decoder.{i}.{j}": s for i in range(6) for j, s in enumerate(dec)}
    bank = MaskBank(shapes, alpha=0.7)
    zeros = {n: torch.zeros(s[0], s[1] // 32, dtype=torch.int32) for n, s in shapes.items()}
    for p in range(36):
        bank.add_pair(f"p{p}", zeros)  # shared storage: the test checks the accounting
    st = bank.stats()
    weights = sum(a * b for a, b in shapes.values())
    assert st["weights_per_pair"] == weights
    assert st["bits_per_weight_per_pair"] == 1.0
    allocated = sum(t.nbytes for t in bank["p0"].values())
    assert st["bytes_per_pair"] == allocated == weights // 8
    assert st["total_bytes"] == 36 * weights // 8
