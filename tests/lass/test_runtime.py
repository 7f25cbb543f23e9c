"""runtime.claimed: a shared work queue over the process group's store."""

import os
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from lass_sparse.lass import runtime


def _worker(rank: int, world: int, init: str, out: str, slow_rank: int) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    got = []
    for i in runtime.claimed("wave0", 12, world, rank):
        got.append(i)
        time.sleep(0.5 if rank == slow_rank else 0.01)
    with open(os.path.join(out, f"{rank}.txt"), "w") as f:
        f.write(" ".join(map(str, got)))
    dist.barrier()
    dist.destroy_process_group()


def test_claimed_is_a_shared_queue(tmp_path):
    """Every index runs exactly once; the busy rank takes fewer (not the static half)."""
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path), 1), nprocs=2, join=True)
    got = [list(map(int, (tmp_path / f"{r}.txt").read_text().split())) for r in range(2)]
    assert sorted(got[0] + got[1]) == list(range(12))
    assert len(got[1]) < 6 < len(got[0]), got


def test_claimed_without_a_process_group_is_the_static_split():
    assert list(runtime.claimed("w", 7, 1, 0)) == list(range(7))
    assert list(runtime.claimed("w", 7, 2, 1)) == [1, 3, 5]
