"""Pair-grouped batching and the DDP recipe for LaSS joint training (DESIGN §6).

Every batch holds one pair (the mask is per batch); pairs are drawn with temperature sampling
(``p_pair ∝ (n_pair / N) ** (1 / T)``, T = 5 in LaSS). Under ``torchrun`` each rank gets whole
single-pair batches from one global, seed-determined sequence; before each optimizer step the
ranks all-gather their pairs so :class:`~lass_sparse.optim.MaskedAdamW` applies the union of the
masks of everything that was all-reduced::

    sampler = PairGroupedSampler(pair_indices, batch_size, rank=rank, num_replicas=world)
    ddp = DistributedDataParallel(model)           # model converted, bank attached
    for pair, idx in sampler.batches():
        with lass_sparse.active_pair(model, pair):
            loss(ddp, idx).backward()               # DDP averages the gradients
        opt.note_pair(*gather_pairs(pair))
        opt.step(); opt.zero_grad()

FSDP2 works the same way (``fully_shard`` each layer and the root instead of DDP): parameters
are row-sharded DTensors and :class:`~lass_sparse.optim.MaskedAdamW` applies the matching row
slice of each packed mask to the local shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist


def temperature_probs(sizes: Mapping[str, int], temperature: float) -> dict[str, float]:
    """``p_pair ∝ (n_pair / N) ** (1 / T)``; T=1 is proportional, T→∞ uniform."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    total = sum(sizes.values())
    if total <= 0:
        raise ValueError("temperature_probs: no examples")
    w = {p: (n / total) ** (1.0 / temperature) if n else 0.0 for p, n in sizes.items()}
    z = sum(w.values())
    return {p: v / z for p, v in w.items()}


class PairGroupedSampler(torch.utils.data.Sampler):
    """Batch sampler whose batches each hold examples of a single pair.

    Args:
        pair_indices: pair -> dataset indices of its examples.
        batch_size: examples per batch (the cap per batch when ``max_tokens`` is set).
        temperature: pair sampling temperature (LaSS: 5).
        batches_per_epoch: global batches per epoch (default: enough to cover every example once
            in expectation, ``sum(ceil(n / batch_size))``, or the number of token batches).
        max_tokens, lengths: token batches as in fairseq — each pair's examples are shuffled,
            sorted by length (``lengths[i]``: tokens of dataset example ``i``, e.g. the longer of
            source and target), and cut into batches whose padded size ``rows × longest`` stays
            within ``max_tokens`` (an example longer than that gets a batch of its own); the
            batches of a pair are then drawn in random order.
        num_replicas, rank: distributed split (default: from torch.distributed when initialised).
        seed: the sequence depends only on (seed, epoch); call :meth:`set_epoch` each epoch.
    """

    def __init__(
        self,
        pair_indices: Mapping[str, Sequence[int]],
        batch_size: int,
        *,
        temperature: float = 5.0,
        batches_per_epoch: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        max_tokens: int | None = None,
        lengths: Sequence[int] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"PairGroupedSampler: batch_size must be > 0, got {batch_size}")
        if max_tokens is not None and (max_tokens <= 0 or lengths is None):
            raise ValueError("PairGroupedSampler: max_tokens must be > 0 and needs lengths=")
        self.max_tokens = max_tokens
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths),
                                                                    dtype=torch.long)
        self.pairs = [p for p, idx in pair_indices.items() if len(idx)]
        if not self.pairs:
            raise ValueError("PairGroupedSampler: every pair is empty")
        self.indices = {p: torch.as_tensor(list(pair_indices[p]), dtype=torch.long)
                        for p in self.pairs}
        self.batch_size = batch_size
        self.probs = temperature_probs({p: len(i) for p, i in self.indices.items()}, temperature)
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"PairGroupedSampler: rank {rank} not in [0, {num_replicas})")
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        if max_tokens is not None:
            g0 = torch.Generator().manual_seed(seed)
            total = batches_per_epoch or sum(len(self._token_batches(p, g0))
                                             for p in self.pairs)
        else:
            total = batches_per_epoch or sum(
                math.ceil(len(i) / batch_size) for i in self.indices.values())
        self.global_batches = max(num_replicas, total - total % num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.global_batches // self.num_replicas

    def _token_batches(self, pair: str, g: torch.Generator) -> list[list[int]]:
        """``pair``'s examples in length-bucketed batches of at most ``max_tokens`` padded tokens
        (and ``batch_size`` rows), in random order."""
        idx = self.indices[pair][torch.randperm(len(self.indices[pair]), generator=g)]
        lens = self.lengths[idx]
        order = torch.argsort(lens, stable=True)  # random order among equal lengths
        idx, lens = idx[order].tolist(), lens[order].tolist()
        out: list[list[int]] = []
        cur: list[int] = []
        longest = 0
        for i, n in zip(idx, lens):
            if cur and (max(longest, n) * (len(cur) + 1) > self.max_tokens
                        or len(cur) >= self.batch_size):
                out.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        if cur:
            out.append(cur)
        perm = torch.randperm(len(out), generator=g).tolist()
        return [out[j] for j in perm]

    def _global(self) -> Iterator[tuple[str, list[int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        probs = torch.tensor([self.probs[p] for p in self.pairs], dtype=torch.float64)
        choice = torch.multinomial(probs, self.global_batches, replacement=True, generator=g)
        if self.max_tokens is not None:
            queue: dict[str, list[list[int]]] = {p: [] for p in self.pairs}
            for c in choice.tolist():
                p = self.pairs[c]
                if not queue[p]:  # pair's batches used up: new shuffle, new buckets
                    queue[p] = self._token_batches(p, g)
                yield p, queue[p].pop()
            return
        perm = {p: torch.randperm(len(i), generator=g) for p, i in self.indices.items()}
        pos = dict.fromkeys(self.pairs, 0)
        for c in choice.tolist():
            p = self.pairs[c]
            idx, n = self.indices[p], len(self.indices[p])
            take = []
            while len(take) < self.batch_size and len(take) < n:
                if pos[p] == n:  # pair exhausted: reshuffle and continue
                    perm[p] = torch.randperm(n, generator=g)
                    pos[p] = 0
                step = min(self.batch_size - len(take), n - pos[p])
                take += idx[perm[p][pos[p]:pos[p] + step]].tolist()
                pos[p] += step
            yield p, take

    def global_sequence(self) -> list[tuple[str, list[int]]]:
        """Every rank's ``(pair, indices)`` batches of this epoch in global order (batch ``i``
        belongs to rank ``i % num_replicas``): what one process accumulating the ranks' batches
        consumes."""
        return list(self._global())

    def batches(self) -> Iterator[tuple[str, list[int]]]:
        """This rank's ``(pair, indices)`` batches: global batches ``rank, rank + W, ...``."""
        for i, b in enumerate(self._global()):
            if i % self.num_replicas == self.rank:
                yield b

    def __iter__(self) -> Iterator[list[int]]:
        for _, idx in self.batches():
            yield idx


def gather_pairs(*pairs: str) -> list[str]:
    """All ranks' pairs of this step (each rank may pass several: its accumulated batches), in
    rank order without repeats (just ``pairs`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(dict.fromkeys(pairs))
    out: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(pairs))
    return list(dict.fromkeys(p for ps in out if ps for p in ps))


def world_and_rank() -> tuple[int, int]:
    """``(world size, rank)`` of the initialised process group, else ``(1, 0)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0
