"""PairGroupedSampler and the DDP recipe: 2 gloo processes == 1 process with accumulation."""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lass_sparse as ls
from lass_sparse import MaskBank
from lass_sparse.distributed import PairGroupedSampler, gather_pairs, temperature_probs
from lass_sparse.optim import MaskedAdamW

PAIRS = {"en-de": range(0, 20), "en-fr": range(20, 28), "en-zh": range(28, 60)}
BATCH, WORLD = 4, 2


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    ls.convert(model)
    bank = MaskBank({"0.weight": (32, 16), "2.weight": (8, 32)}, alpha=0.7)
    g = torch.Generator().manual_seed(1)
    for p in PAIRS:
        bank.add_pair(p, {n: torch.rand(s, generator=g) < 0.3 for n, s in bank.shapes.items()})
    ls.attach(model, bank)
    x = torch.randn(60, 16, generator=g)
    y = torch.randn(60, 8, generator=g)
    opt = MaskedAdamW(model.parameters(), lr=1e-2).bind(model, bank)
    return model, bank, x, y, opt


def _loss(net, x, y):
    return (net(x) - y).pow(2).mean()


def _train(rank: int, out: str, mode: str) -> None:
    model, bank, x, y, opt = _setup()
    if mode == "fsdp":  # FSDP2: row-sharded DTensor params, masks sliced to match
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        ddp = fully_shard(model)
        opt = MaskedAdamW(model.parameters(), lr=1e-2).bind(model, bank)
    else:
        ddp = nn.parallel.DistributedDataParallel(model)
    sampler = PairGroupedSampler(PAIRS, BATCH, seed=3)
    assert (sampler.rank, sampler.num_replicas) == (rank, WORLD)
    for pair, idx in sampler.batches():
        with ls.active_pair(model, pair):
            _loss(ddp, x[idx], y[idx]).backward()
        opt.note_pair(*gather_pairs(pair))
        opt.step()
        opt.zero_grad()
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
             for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(state, out)


def _ddp_worker(rank: int, init_file: str, out: str, mode: str = "ddp") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        _train(rank, out, mode)  # returns with DDP/FSDP (and their work handles) released
        gc.collect()
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_accumulation(tmp_path, mode):
    """DDP (all-reduced grads) and FSDP2 (row-sharded params and masks) on gloo."""
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), out, mode), nprocs=WORLD, join=True)
    ddp_state = torch.load(out)

    model, bank, x, y, opt = _setup()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    batches = list(PairGroupedSampler(PAIRS, BATCH, seed=3, num_replicas=1,
                                      batches_per_epoch=len(PairGroupedSampler(
                                          PAIRS, BATCH, seed=3, num_replicas=WORLD)) * WORLD
                                      ).batches())
    touched: set[str] = set()
    for s in range(0, len(batches), WORLD):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        step_pairs = []
        for pair, idx in batches[s:s + WORLD]:
            with ls.active_pair(model, pair):
                (_loss(model, x[idx], y[idx]) / WORLD).backward()
            step_pairs.append(pair)
        opt.note_pair(*step_pairs)
        opt.step()
        opt.zero_grad()
        touched |= set(step_pairs)
        union = bank.union(sorted(set(step_pairs)))
        for name, bits in union.items():  # off-union entries unchanged by this step
            off = ~ls.unpack_mask(bits, bank.shapes[name][-1])
            assert torch.equal(model.state_dict()[name][off], before[name][off])
    assert len(batches) >= 4 and len(touched) >= 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, atol=1e-6, rtol=1e-5, msg=k)
    union = bank.union(list(touched))
    never = {n: ~ls.unpack_mask(b, bank.shapes[n][-1]) for n, b in union.items()}
    for n, off in never.items():
        assert torch.equal(ddp_state[n][off], init[n][off])


def test_sampler_batches_are_single_pair_deterministic_and_split_across_ranks():
    s0 = PairGroupedSampler(PAIRS, BATCH, num_replicas=2, rank=0, seed=5)
    s1 = PairGroupedSampler(PAIRS, BATCH, num_replicas=2, rank=1, seed=5)
    full = list(PairGroupedSampler(PAIRS, BATCH, num_replicas=1, seed=5,
                                   batches_per_epoch=s0.global_batches).batches())
    b0, b1 = list(s0.batches()), list(s1.batches())
    assert len(b0) == len(b1) == len(s0) and full[0::2] == b0 and full[1::2] == b1
    for pair, idx in full:
        assert len(idx) == BATCH and set(idx) <= set(PAIRS[pair])
    assert b0 == list(s0.batches())  # deterministic per epoch
    s0.set_epoch(1)
    assert b0 != list(s0.batches())
    assert list(iter(s1)) == [i for _, i in b1]


def test_temperature_sampling_flattens_the_pair_distribution():
    sizes = {"a": 900, "b": 100}
    assert temperature_probs(sizes, 1.0) == pytest.approx({"a": 0.9, "b": 0.1})
    p5 = temperature_probs(sizes, 5.0)
    assert 0.5 < p5["a"] < 0.9 and p5["a"] + p5["b"] == pytest.approx(1.0)
    s = PairGroupedSampler({"a": range(900), "b": range(900, 1000)}, 10, temperature=5.0,
                           batches_per_epoch=4000, seed=0)
    share = sum(p == "b" for p, _ in s.batches()) / 4000
    assert share == pytest.approx(p5["b"], abs=0.03)
    with pytest.raises(ValueError, match="temperature"):
        temperature_probs(sizes, 0)
    with pytest.raises(ValueError, match="rank"):
        PairGroupedSampler(PAIRS, 4, num_replicas=2, rank=2)


if os.environ.get("LASS_SPARSE_SKIP_DIST"):
    pytestmark = pytest.mark.skip(reason="LASS_SPARSE_SKIP_DIST is set")
