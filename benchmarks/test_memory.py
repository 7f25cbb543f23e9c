"""Memory model: per-pair masks for Transformer-base/-big as bool (original LaSS), float
(torch.nn.utils.prune: a float mask per pair + weight_orig), packed (ours, in memory; checked
against allocated bytes) and compact on disk (ours; measured on a bank of related masks)."""

from __future__ import annotations

import pytest
import torch
from common import tag

import lass_sparse as ls


def shapes(d: int, f: int, layers: int = 6) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(layers):
        out |= {f"encoder.{i}.in_proj": (3 * d, d), f"encoder.{i}.out_proj": (d, d),
                f"encoder.{i}.fc1": (f, d), f"encoder.{i}.fc2": (d, f)}
        out |= {f"decoder.{i}.self_in_proj": (3 * d, d), f"decoder.{i}.self_out": (d, d),
                f"decoder.{i}.cross_in_proj": (3 * d, d), f"decoder.{i}.cross_out": (d, d),
                f"decoder.{i}.fc1": (f, d), f"decoder.{i}.fc2": (d, f)}
    return out


MODELS = {"base": shapes(512, 2048), "big": shapes(1024, 4096)}


@pytest.mark.parametrize("pairs", [1, 8, 36, 100])
@pytest.mark.parametrize("model", ["base", "big"])
def test_memory_model(benchmark, model, pairs, is_smoke):
    sh = MODELS[model]
    weights = sum(a * b for a, b in sh.values())
    bank = ls.MaskBank(sh, alpha=0.5)
    one = {n: torch.zeros(a, b // 32, dtype=torch.int32) for n, (a, b) in sh.items()}
    bank.add_pair("p0", one)
    allocated = sum(t.nbytes for t in bank["p0"].values())
    packed = bank.stats()["bytes_per_pair"]
    assert packed == allocated == weights // 8
    row = {"weights": weights, "bool_bytes": pairs * weights,
           "torch_prune_bytes": pairs * 4 * weights + 4 * weights,
           "packed_bytes": pairs * packed}
    tag(benchmark, "memory_model", "ours", model=model, pairs=pairs)
    benchmark.extra_info.update({k: str(v) for k, v in row.items()})
    benchmark(lambda: bank.stats())
    assert row["bool_bytes"] == 8 * row["packed_bytes"]


def test_compact_bits_per_weight_on_related_masks(benchmark, tmp_path, is_smoke):
    """Masks of related pairs (2% of bits differ from a shared structure) on disk."""
    torch.manual_seed(0)
    sh = {"w": (256, 512)} if is_smoke else {"w": (2048, 512), "v": (512, 2048)}
    base = {n: torch.rand(s) < 0.5 for n, s in sh.items()}
    bank = ls.MaskBank(sh, alpha=0.5)
    for p in range(8):
        bank.add_pair(f"p{p}", {n: m ^ (torch.rand(m.shape) < 0.02) for n, m in base.items()})
    path = str(tmp_path / "bank.safetensors")
    tag(benchmark, "compact_save", "ours", pairs=8)
    size = benchmark(lambda: bank.save(path, compact=True))
    bits = size * 8 / (sum(a * b for a, b in sh.values()) * 8)
    benchmark.extra_info["bits_per_weight_per_pair"] = f"{bits:.3f}"
    assert bits < 0.5
