"""The CLI's training stages under ``torchrun`` (2 CPU processes, gloo) against one process with
the matching gradient accumulation; fine-tunes spread over ranks; resume after a rank is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("sentencepiece")

import lass_sparse as ls  # noqa: E402
from lass_sparse.lass import pipeline as P  # noqa: E402
from lass_sparse.lass.checkpoint import read_state  # noqa: E402
from lass_sparse.testing import run_process_group  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")
SMALL = dict(d_model=32, heads=2, ffn=64, enc_layers=1, dec_layers=1, dropout=0.1)
TRAIN = ["--device", "cpu", "--quiet", "--batch-size", "8", "--ckpt-every", "2", "--lr", "3e-3",
         "--warmup", "1"]
TOL = 2e-5  # fp32: gloo's all-reduce mean vs accumulated halves, a few ulps per step


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _cli(*args: str, nproc: int = 1, check: bool = True, **kw):
    if nproc == 1:
        cmd = [sys.executable, "-m", "lass_sparse.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "lass_sparse.cli", "--", *args]
    p = run_process_group(cmd, env=_env(), timeout=600, **kw)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def _params(run_dir: str, stage: str) -> dict[str, torch.Tensor]:
    return P.open_run(run_dir, "cpu").load_model(stage, "last").state_dict()


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A run with a base trained in one process (accum 2), four fine-tunes and masks."""
    root = tmp_path_factory.mktemp("torchrun")
    one = str(root / "one")
    P.prepare(one, "demo", "tiny", vocab_size=300, pairs=["en-de", "en-fr"], max_train=60,
              device="cpu", **SMALL)
    t0 = time.perf_counter()
    _cli("train", "--run", one, "--steps", "4", "--accum", "2", *TRAIN)
    t_one = time.perf_counter() - t0
    return root, one, t_one


def test_two_ranks_train_the_base_like_one_process_accumulating_two(made):
    root, one, t_one = made
    two = str(root / "two")
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("base"))
    t0 = time.perf_counter()
    _cli("train", "--run", two, "--steps", "4", *TRAIN, nproc=2)
    t_two = time.perf_counter() - t0
    a, b = _params(one, "base"), _params(two, "base")
    diff = _max_diff(a, b)
    assert diff <= TOL, diff
    assert _max_diff(a, _params(one, "base")) == 0.0
    init = P.open_run(one, "cpu").new_model().state_dict()
    assert _max_diff(init, b) > 1e-3  # it trained
    with open(os.path.join(two, "base", "log.jsonl")) as f:
        start = json.loads(f.readline())
    assert start["event"] == "start" and start["world_size"] == 2 and start["accum"] == 1
    print(f"\nbase, 4 steps: 1 process (accum 2) {t_one:.1f} s, 2 processes {t_two:.1f} s; "
          f"max |Δθ| {diff:.2e}")


def test_finetunes_spread_over_ranks_equal_one_process(made):
    root, one, _ = made
    two = str(root / "ft-two")
    shutil.copytree(one, two)
    _cli("finetune", "--run", one, "--pair", "all", "--steps", "2", *TRAIN)
    _cli("finetune", "--run", two, "--pair", "all", "--steps", "2", *TRAIN, nproc=2)
    run = P.open_run(one, "cpu")
    for d in run.directions:  # each fine-tune ran alone in one rank: bit-identical
        assert _max_diff(_params(one, f"ft/{d}"), _params(two, f"ft/{d}")) == 0.0, d
        with open(os.path.join(two, "ft", d, "log.jsonl")) as f:
            assert json.loads(f.readline())["world_size"] == 1


def _copies_with_masks(made, *names: str) -> tuple[str, ...]:
    """Copies (without a joint stage) of the base run once it has fine-tunes and masks."""
    root, one, _ = made
    if not os.path.exists(os.path.join(one, "masks.safetensors")):
        if not os.path.exists(os.path.join(one, "ft")):
            _cli("finetune", "--run", one, "--pair", "all", "--steps", "2", *TRAIN)
        _cli("prune", "--run", one, "--alpha", "0.5", "--device", "cpu")
    out = tuple(str(root / n) for n in names)
    for d in out:
        shutil.copytree(one, d, ignore=shutil.ignore_patterns("joint"))
    return out


def test_two_ranks_joint_train_like_one_process_and_respect_masks(made):
    a, b = _copies_with_masks(made, "joint-one", "joint-two")
    src = made[1]
    _cli("joint", "--run", a, "--steps", "4", "--accum", "2", *TRAIN)
    _cli("joint", "--run", b, "--steps", "4", *TRAIN, nproc=2)
    pa, pb = _params(a, "joint"), _params(b, "joint")
    assert _max_diff(pa, pb) <= TOL
    base = _params(src, "base")
    bank = ls.MaskBank.load(os.path.join(src, "masks.safetensors"))
    union = bank.union(bank.pairs)
    checked = 0
    for name, bits in union.items():
        if name in pb:
            off = ~ls.unpack_mask(bits, bank.shapes[name][-1])
            assert torch.equal(pb[name][off], base[name][off]), name  # bit-identical off-mask
            checked += int(off.sum())
    assert checked > 0


@pytest.mark.parametrize("command", [["prune", "--alpha", "0.5"], ["demo"]])
def test_refuses_non_training_commands_under_torchrun(made, command):
    run = os.path.join(str(made[0]), "refused") if command[0] == "demo" else made[1]
    p = _cli(command[0], "--run", run, *command[1:], nproc=2, check=False)
    assert p.returncode != 0
    assert "runs in one process: start it without torchrun" in p.stderr
    assert not os.path.exists(os.path.join(str(made[0]), "refused"))  # before any work


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs pgrep to find the ranks")
def test_killed_rank_then_restart_resumes_from_the_last_checkpoint(made):
    killed, ref = _copies_with_masks(made, "killed", "ref")
    args = ["joint", "--run", killed, "--steps", "400", *TRAIN]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lass_sparse.cli", "--", *args]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state = os.path.join(killed, "joint", "ckpt", "state.json")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (os.path.exists(state)
                                               and read_state(os.path.dirname(state))["step"]
                                               >= 4):
            time.sleep(0.2)
        ranks = _children(proc.pid)
        assert ranks, "no rank processes found"
        os.kill(ranks[-1], signal.SIGKILL)  # one rank dies; torchrun tears the job down
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    step = int(read_state(os.path.dirname(state))["step"])
    assert 4 <= step < 400
    until = step + 2
    _cli("joint", "--run", killed, "--steps", str(until), *TRAIN, nproc=2)
    with open(os.path.join(killed, "joint", "log.jsonl")) as f:
        starts = [r for r in map(json.loads, f) if r.get("event") == "start"]
    assert starts[-1]["step"] == step  # the restart resumed there, not from 0
    _cli("joint", "--run", ref, "--steps", str(until), *TRAIN, nproc=2)
    assert _max_diff(_params(killed, "joint"), _params(ref, "joint")) == 0.0


def test_fsdp_two_ranks_like_one_process_and_resume_whole(made):
    """--fsdp: FSDP2-sharded joint training equals one process accumulating two batches; its
    checkpoints are whole (they load in one process) and a stop/restart continues exactly."""
    a, b, c = _copies_with_masks(made, "fsdp-one", "fsdp-two", "fsdp-resumed")
    src = made[1]
    _cli("joint", "--run", a, "--steps", "4", "--accum", "2", *TRAIN)
    _cli("joint", "--run", b, "--steps", "4", "--fsdp", *TRAIN, nproc=2)
    pa, pb = _params(a, "joint"), _params(b, "joint")  # loads the FSDP checkpoint unsharded
    assert _max_diff(pa, pb) <= TOL
    with open(os.path.join(b, "joint", "log.jsonl")) as f:
        start = json.loads(f.readline())
    assert start["sharding"] == "fsdp2" and start["sharded_params"] == len(pb)  # every one
    base = _params(src, "base")
    bank = ls.MaskBank.load(os.path.join(src, "masks.safetensors"))
    for name, bits in bank.union(bank.pairs).items():
        if name in pb:
            off = ~ls.unpack_mask(bits, bank.shapes[name][-1])
            assert torch.equal(pb[name][off], base[name][off]), name
    _cli("joint", "--run", c, "--steps", "2", "--fsdp", *TRAIN, nproc=2)
    _cli("joint", "--run", c, "--steps", "4", "--fsdp", *TRAIN, nproc=2)
    assert _max_diff(_params(c, "joint"), pb) == 0.0
