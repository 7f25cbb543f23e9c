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


def _leave_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    assert runtime.init_process_group("cpu") == (2, rank)
    runtime.leave_process_group()
    left = not dist.is_initialized()
    runtime.leave_process_group()  # twice: a no-op
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port + 1}", rank=rank,
                            world_size=2)
    runtime.leave_process_group()  # a group the caller made: not ours to destroy
    kept = dist.is_initialized()
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out, f"{rank}.txt"), "w") as f:
        f.write(f"{left} {kept}")


def test_leave_process_group_destroys_only_the_group_it_joined(tmp_path):
    """The CLI leaves the group it joined when a command ends (gloo can abort at interpreter
    exit with a group alive); a group the caller made stays."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_leave_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"{r}.txt").read_text() for r in range(2)] == ["True True"] * 2


def test_claimed_without_a_process_group_is_the_static_split():
    assert list(runtime.claimed("w", 7, 1, 0)) == list(range(7))
    assert list(runtime.claimed("w", 7, 2, 1)) == [1, 3, 5]


def test_compiled_training_matches_eager_and_compiles_once_for_all_pairs(tmp_path):
    """``--compile`` (TrainConfig.compile): a joint stage over two pairs trains as the eager
    stage does (dropout 0: the same losses to float tolerance), its pair switches reuse the
    graphs of its first steps, and the stage log records it."""
    import json

    import torch._dynamo

    from lass_sparse.lass import pipeline as P

    small = dict(d_model=32, heads=2, ffn=64, enc_layers=1, dec_layers=1, dropout=0.0)
    kw = dict(batch_size=8, progress=False, ckpt_every=100)
    res = {}
    for mode in (False, True):
        r = P.prepare(str(tmp_path / f"r{int(mode)}"), "demo", "tiny", vocab_size=200,
                      pairs=["en-de", "en-fr"], max_train=40, device="cpu", **small)
        P.train(r, 2, out="base", **kw)
        for d in r.directions:
            P.finetune(r, d, 1, **kw)
        P.prune(r, 0.5, out="masks.safetensors")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        res[mode] = P.joint(r, "masks.safetensors", 6, out="joint", compile=mode, **kw)
        if mode:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4
            with open(r.path("joint", "log.jsonl")) as f:
                start = next(json.loads(x) for x in f if '"start"' in x)
            assert start["compile"] is True
    assert res[True]["steps"] == res[False]["steps"] == 6
    assert abs(res[True]["mean_loss"] - res[False]["mean_loss"]) < 1e-3


def test_training_reads_values_back_only_at_log_steps(tmp_path, monkeypatch):
    """The training loop reads the loss from the device only at log steps (and once for the
    stage's mean): 10 steps, log_every 5 -> 3 reads (a read every step made the host wait for
    each step on a GPU). The log lines still carry the loss and a tokens/s > 0."""
    import json

    import torch

    from lass_sparse.lass import pipeline as P

    r = P.prepare(str(tmp_path / "r"), "demo", "tiny", vocab_size=200, pairs=["en-de"],
                  max_train=40, device="cpu", d_model=32, heads=2, ffn=64, enc_layers=1,
                  dec_layers=1)
    reads = []  # values of floating tensors (model outputs, losses) read on the host; the
    # sampler's host-side index tensors are not device data
    for name in ("__float__", "item", "tolist", "__bool__", "__int__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _r=real, _n=name):
            if self.is_floating_point():
                reads.append(_n)
            return _r(self, *a)

        monkeypatch.setattr(torch.Tensor, name, spy)
    res = P.train(r, 10, out="base", batch_size=8, progress=False, ckpt_every=100, log_every=5)
    monkeypatch.undo()
    assert reads == ["__float__"] * 3
    with open(r.path("base", "log.jsonl")) as f:
        lines = [json.loads(x) for x in f if '"loss"' in x]
    assert [x["step"] for x in lines] == [5, 10]
    assert all(x["tokens_per_s"] > 0 and x["loss"] > 0 for x in lines)
    assert res["mean_loss"] > 0
